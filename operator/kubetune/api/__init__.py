"""The kubetune API (kubetune.dev/v1alpha1): pydantic models, the single source of truth."""

from kubetune.api.common import API_VERSION, GROUP, VERSION
from kubetune.api.finetune import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from kubetune.api.quantize import QuantizeJob, QuantizeJobSpec, QuantizeJobStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "QuantizeJob",
    "QuantizeJobSpec",
    "QuantizeJobStatus",
]
