from .backbone_pretrainer import BackbonePretrainer

__all__ = ['BackbonePretrainer']
