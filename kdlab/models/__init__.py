"""Model zoo: a registry of CIFAR classifiers that all share the `StagedModel` shape.

Importing this package registers every model (``vgg16``, ``resnet18``, ``densenet121``,
``densenet121_cifar``) and the sources of models from elsewhere (``timm:``, ``torchvision:``,
``module:``; their libraries are imported only when one of their models is asked for) and
``pruned:`` (structurally pruned models, see ``pruned.py``).
"""

# Imported to register the models and the sources.
from kdlab.models import (  # noqa: F401
    densenet,
    module_source,
    pruned,
    resnet,
    timm_source,
    torchvision_source,
    vgg,
)
from kdlab.models.base import StagedModel
from kdlab.models.foreign import ForeignModel
from kdlab.models.registry import (
    ModelSource,
    check_model_name,
    count_params,
    create_model,
    display_name,
    input_size_note,
    list_models,
    list_sources,
    model_family,
    paper_params,
    register_model,
    register_source,
)

__all__ = [
    "ForeignModel",
    "ModelSource",
    "StagedModel",
    "check_model_name",
    "count_params",
    "create_model",
    "display_name",
    "input_size_note",
    "list_models",
    "list_sources",
    "model_family",
    "paper_params",
    "register_model",
    "register_source",
]
