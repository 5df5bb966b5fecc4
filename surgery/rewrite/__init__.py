"""Stage 5: realize matched rewrites on the host model."""
from surgery.rewrite.actions import realize, site_key
from surgery.rewrite.host import AdapterStore, Record, WeightSite, attach_weight_site, store_of, transformed

__all__ = ["AdapterStore", "Record", "WeightSite", "attach_weight_site", "realize", "site_key", "store_of", "transformed"]
