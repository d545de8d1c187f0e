"""IP-Adapter: image projection (base/plus), decoupled cross-attention patch, official file layout."""
from .adapter import AdapterSpec, IPAdapterModel, spec_from_state_dict
from .patch import ImageCondition, cross_attention_sites, install

__all__ = ["AdapterSpec", "IPAdapterModel", "ImageCondition", "cross_attention_sites", "install", "spec_from_state_dict"]
