"""The hyperparameters a user may choose, as one pydantic model built from the publisher's ServiceConfig.

The API validates every submission with it, `GET /v1/models` shows its defaults and bounds, and the OpenAPI
schema of `POST /v1/fine-tunes` is its JSON schema: the limits are written once, in ServiceConfig, and cannot
drift apart between what is enforced and what is documented.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .config import ServiceConfig

SEED_MAX = 2**31 - 1
# What the publisher fixes; a submission naming one is told so instead of "unknown field".
PUBLISHER_FIXED = ("model", "guard", "lora_targets", "lora_target", "target_modules", "base_model")


class HyperparameterError(ValueError):
    """A submission's hyperparameters are refused: `code` is the API error code, `param` the field."""

    def __init__(self, code: str, message: str, param: str | None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def hyperparameter_model(cfg: ServiceConfig) -> type[BaseModel]:
    """The model of one job's hyperparameters under `cfg`'s defaults and limits (unknown fields refused)."""
    method = Literal[tuple(cfg.methods)]  # type: ignore[valid-type]
    fields: dict[str, Any] = {
        # the enum stated even for one method (pydantic would write a bare 'const'), so clients read it one way
        "method": (method, Field(cfg.default_method, json_schema_extra={"enum": list(cfg.methods)},
                                 description="'full' trains the UNet tensors the guard leaves free; 'lora' trains a "
                                 "LoRA adapter on the modules that own no frozen tensor")),
        "steps": (int, Field(cfg.default_steps, ge=1, le=cfg.max_steps, description="optimizer steps")),
        "batch_size": (int, Field(cfg.default_batch_size, ge=1, le=cfg.max_batch_size,
                                  description="examples per step (the job's global batch, however many processes "
                                  "train it)")),
        "learning_rate": (float, Field(cfg.default_learning_rate, ge=cfg.min_learning_rate, le=cfg.max_learning_rate,
                                       allow_inf_nan=False, description="AdamW learning rate")),
        "lora_rank": (int, Field(cfg.default_lora_rank, ge=1, le=cfg.max_lora_rank,
                                 description="LoRA rank (method 'lora' only)")),
        "seed": (int, Field(0, ge=0, le=SEED_MAX, description="seed of the run (data order, noise, samples)")),
    }
    return create_model("Hyperparameters", __config__=ConfigDict(extra="forbid"), **fields)


def names(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(model.model_fields)


def bounds(model: type[BaseModel]) -> dict[str, list[Any]]:
    """[minimum, maximum] of each numeric hyperparameter, as the JSON schema states them."""
    props = model.model_json_schema()["properties"]
    return {n: [p["minimum"], p["maximum"]] for n, p in props.items() if "minimum" in p and "maximum" in p}


def parse(model: type[BaseModel], fields: dict[str, str]) -> dict[str, Any]:
    """A submission's form fields (strings; empty means 'the publisher's default') as validated hyperparameters."""
    for name in fields:
        if name in PUBLISHER_FIXED:
            raise HyperparameterError("publisher_fixed", f"{name}: the publisher fixes the base model, the guard and "
                                      "the LoRA targets; they cannot be chosen per job", name)
    given = {k: v for k, v in fields.items() if v != ""}
    try:
        return model.model_validate(given).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            raise HyperparameterError("unknown_parameter", f"{name}: unknown field; the hyperparameters are "
                                      f"{', '.join(names(model))}", name) from None
        limits = bounds(model).get(name or "")
        shown = f"; the publisher's limits are [{limits[0]}, {limits[1]}]" if limits else ""
        raise HyperparameterError("invalid_hyperparameters", f"{name}: {first['msg']}, got {given.get(name)!r}{shown}",
                                  name) from None
