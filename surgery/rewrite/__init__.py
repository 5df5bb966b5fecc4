"""Stage 5: realize matched rewrites on the host model."""
from surgery.rewrite.actions import realize, site_key
from surgery.rewrite.host import AdapterStore, Record, WeightSite, store_of

__all__ = ["AdapterStore", "Record", "WeightSite", "realize", "site_key", "store_of"]
