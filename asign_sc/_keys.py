"""Every storage key asign_sc reads or writes, in one place (like :class:`squidpy._constants.Key`).

Nothing else in the package spells a key as a literal: functions take ``key_added``-style
arguments whose defaults come from here, and the concepts page of the docs lists this
registry as the table of everything the package writes.
"""

from __future__ import annotations

from typing import Final

__all__ = ["LEVELS", "Key"]

LEVELS: Final = ("spot", "region", "global")
"""The three window levels of ASIGN's image features and expression targets."""


class Key:
    """Names of the keys used in :class:`~anndata.AnnData` and :class:`~spatialdata.SpatialData`."""

    class obs:
        """Columns of ``table.obs``."""

        library: Final = "section"
        """Section (library) of each spot: categorical, categories in stacking order."""
        sample: Final = "sample"
        """Patient / sample of each spot, when one object holds several stacks."""
        region: Final = "region"
        """spatialdata ``region_key``: the shapes element a spot belongs to."""
        instance: Final = "spot_id"
        """spatialdata ``instance_key``: the spot's index within its shapes element."""
        array_row: Final = "array_row"
        array_col: Final = "array_col"

        @staticmethod
        def window_padding(key_added: str, level: str) -> str:
            """Fraction of a spot's feature window (spot, region, global) padded past the image."""
            return f"{key_added}_{level}_padding"

    class obsm:
        """Entries of ``table.obsm``."""

        spatial: Final = "spatial"
        """Spot centres ``(x, y)`` in full-resolution pixels of the section's own image."""
        spatial_aligned: Final = "spatial_aligned"
        """Spot centres ``(x, y)`` in the common (registered) frame."""

        @staticmethod
        def features(key_added: str, level: str) -> str:
            """Pooled image embedding of one window level: spot, region or global."""
            return f"X_{key_added}_{level}"

        @staticmethod
        def tokens(key_added: str, level: str) -> str:
            """Grid of image tokens of one window level, shape ``(n_obs, n_tokens, dim)``."""
            return f"X_{key_added}_{level}_tokens"

        @staticmethod
        def uncertainty(key_added: str) -> str:
            """Per spot and gene uncertainty of an imputation."""
            return f"{key_added}_uncertainty"

    class obsp:
        """Entries of ``table.obsp`` (squidpy's neighbour-graph convention)."""

        graph3d: Final = "spatial3d"
        """Default ``key_added`` of the 3D spot graph (:func:`asign_sc.gr.build_3d_graph`)."""

        @staticmethod
        def connectivities(key_added: str) -> str:
            return f"{key_added}_connectivities"

        @staticmethod
        def distances(key_added: str) -> str:
            return f"{key_added}_distances"

    class uns:
        """Entries of ``table.uns``."""

        stack: Final = "asign_stack"
        """Section order, library key and spot radii as resolved by the data contract."""
        spatial: Final = "spatial"
        """Legacy squidpy layout: ``uns['spatial'][library_id]['images' | 'scalefactors']``."""
        registration: Final = "asign_registration"

        @staticmethod
        def neighbors(key_added: str) -> str:
            return f"{key_added}_neighbors"

        @staticmethod
        def params(key_added: str) -> str:
            return key_added

    class layers:
        """Entries of ``table.layers``."""

        counts: Final = "counts"
        imputed: Final = "asign"

    class var:
        """Columns of ``table.var``."""

        modelled: Final = "asign_modelled"

        @staticmethod
        def modelled_by(key_added: str) -> str:
            """Boolean column: the gene is filled by the imputation stored under ``key_added``."""
            return f"{key_added}_modelled"

    class sdata:
        """Element and coordinate-system names in :class:`~spatialdata.SpatialData`."""

        table: Final = "table"
        aligned: Final = "aligned"
        """Coordinate system of the registered stack."""

        @staticmethod
        def image(section: str) -> str:
            return f"{section}_image"

        @staticmethod
        def spots(section: str) -> str:
            return f"{section}_spots"

        @staticmethod
        def coordinate_system(section: str) -> str:
            """Each section's own coordinate system: full-resolution pixels of its image."""
            return section

    class legacy:
        """Keys of the legacy squidpy/scanpy Visium layout in ``uns['spatial'][library_id]``."""

        images: Final = "images"
        scalefactors: Final = "scalefactors"
        hires: Final = "hires"
        lowres: Final = "lowres"
        hires_scalef: Final = "tissue_hires_scalef"
        lowres_scalef: Final = "tissue_lowres_scalef"
        spot_diameter: Final = "spot_diameter_fullres"
