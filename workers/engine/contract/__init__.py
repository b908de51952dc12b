"""The contract: every shape that crosses a boundary of the system, declared once.

Torch-free (pydantic and numpy only), so the API process imports it; the engine owns it. From
these declarations come the validation (engine and API refuse the same things, with the same
``SpecError`` messages), the OpenAPI components (``service/openapi.py``), the JSON Schema of
``report.json`` (``workers/reports/schema.py``) and the verdict columns the service stores.

* :mod:`.spec`: the audit spec, method parameters, training recipe and input spec, as pydantic
  dataclasses whose bounds are ``Field`` metadata. They validate on construction, which is what
  the engine's hand-written ``__post_init__`` checks did before; pydantic dataclasses keep them
  frozen stdlib-compatible dataclasses, so the engine code around them is unchanged.
* :mod:`.verdicts`: ``VERDICTS``, ``CONTROLS``, ``PassWhen`` and the :class:`Verdict` shape.
* :mod:`.report`: scores, summaries, map statistics, method and test results and the
  report.json document.
* :mod:`.catalogue`: what ``GET /v1/methods`` lists (methods, tests, the default policy).
* :mod:`.policy`: the verdict policy document; ``workers/engine/policy.py`` takes its key sets
  from it and keeps the checks that span fields, with their messages.
* :mod:`.problem`: the RFC 9457 problem every error response is.
* :mod:`.stage_plan`: which stages of a model randomization test get maps (the stages the
  policy's rule reads), shared by the engine, the report and the cost estimate.
* :mod:`.schema`: the one JSON Schema generator (no titles), components and named enums.

The result shapes (:mod:`.report`, :class:`Verdict`) are plain stdlib dataclasses whose schema
pydantic derives with ``TypeAdapter``: the engine builds thousands of them in an audit and
``dataclasses.asdict`` writes them, so they need no validation at construction, only one
declaration the schema is derived from. Shapes that only exist as JSON (the report's model and
fidelity blocks, the catalogue, the problem) are pydantic models.
"""
