"""Wire models and OpenAPI documentation of the OIP V2 REST routes
(``services/protocols/oip/rest.py``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema

from services.protocols.oip import core as oip

Parameters = dict[str, Any]
_DATA_SCHEMA = {
    "type": "array",
    "items": {},
    "description": "Tensor values in row-major order, flat or nested; omitted for binary tensors",
}


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: Parameters | None = Field(
        None, description="A tabular model's column: content_type 'np' or 'str'"
    )


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: Parameters | None = Field(
        None, description="content_type 'pd': a tabular model, one input per column"
    )


class V2Health(BaseModel):
    live: bool | None = None
    ready: bool | None = None
    name: str | None = None


class V2RequestInput(BaseModel):
    name: str = Field(
        description=f"Input name: '{oip.INPUT_NAME}', or as the model metadata names its inputs"
    )
    # Strict: pydantic's lax mode would read "1" and true as 1 (fuzzing found [true, 4] served).
    # fail_fast (here and on the lists below): one error, not one per element; a 16 MiB body of
    # [0, 0, ...] made 8 M pydantic errors (2.7 GB) before the answer was cut to 20.
    shape: list[StrictInt] = Field(
        description="[rows, *row_shape], as in the model metadata", fail_fast=True
    )
    datatype: str = Field(
        description="OIP datatype (FP32, FP64, INT64, ...; BYTES for a string column)"
    )
    parameters: Parameters | None = Field(
        None, description="'binary_data_size': bytes of this tensor after the JSON header"
    )
    data: Annotated[Any, WithJsonSchema(_DATA_SCHEMA)] = None


class V2RequestOutput(BaseModel):
    name: str = Field(description="One of the model's outputs (model metadata)")
    parameters: Parameters | None = Field(None, description="'binary_data': true for raw bytes")


class V2InferenceRequest(BaseModel):
    """Body of ``POST /v2/models/{name}/infer`` (its JSON header, with binary tensors)."""

    id: str | None = Field(None, description="Echoed in the response")
    parameters: Parameters | None = Field(
        None, description="'binary_data_output': true returns every output as raw bytes"
    )
    inputs: list[V2RequestInput] = Field(fail_fast=True)
    outputs: list[V2RequestOutput] | None = Field(
        None, description="Default: all outputs", fail_fast=True
    )


class V2ResponseOutput(V2TensorMetadata):
    parameters: Parameters | None = None
    data: Annotated[Any, WithJsonSchema(_DATA_SCHEMA)] = None


class V2InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2ResponseOutput]


class V2Error(BaseModel):
    error: str


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with ``$defs`` inlined: OpenAPI cannot resolve ``#/$defs``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_BINARY_SCHEMA = {"schema": {"type": "string", "format": "binary"}}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": desc}
    for code, desc in {
        400: "Malformed body, wrong input name/datatype/shape, non-finite values, unknown output",
        401: "Missing or invalid API key (when keys are configured)",
        403: "The API key may not use this model",
        404: "Unknown model or version",
        413: "Too many rows in one request",
        429: "The API key's rate limit is reached (Retry-After)",
        503: "Model not ready or overloaded",
        # Also keeps FastAPI from documenting its 422, which /v2 never returns.
        "default": "Any other error, e.g. 500, in the same envelope",
    }.items()
}
INFER_ROUTE: dict[str, Any] = {
    "response_model": V2InferenceResponse,
    "responses": {
        200: {
            "description": "Outputs; binary outputs follow a JSON header of "
            "Inference-Header-Content-Length bytes (application/octet-stream)",
            "content": {"application/octet-stream": _BINARY_SCHEMA},
        },
        **ERRORS,
        415: {
            "model": V2Error,
            "description": "Compressed body (any Content-Encoding but identity)",
        },
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _inline_schema(V2InferenceRequest)},
                "application/octet-stream": _BINARY_SCHEMA,
            },
        }
    },
}
