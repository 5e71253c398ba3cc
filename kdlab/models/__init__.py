"""Model zoo: a registry of CIFAR classifiers that all share the `StagedModel` shape.

Importing this package registers every model (``vgg16``, ``resnet18``, ``densenet121``,
``densenet121_cifar``) and the ``pruned:`` source (structurally pruned models, see ``pruned.py``).
"""

from kdlab.models import densenet, pruned, resnet, vgg  # noqa: F401  (imported to register the models)
from kdlab.models.base import StagedModel
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
