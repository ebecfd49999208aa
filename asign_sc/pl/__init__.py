"""Plotting."""

from asign_sc.pl._registration import registration

__all__: list[str] = ["registration"]
