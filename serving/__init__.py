"""Deployment of exported single-logit models with onnxruntime.

Imports numpy, onnxruntime, Pillow and (for HTTP) FastAPI only, never torch, `slc` or `pipeline`, so a
deployment image stays small. `serving.model.SingleLogitModel` is the library; `serving.cli` the
`slc` command; `serving.http` the HTTP app, with `runs` (many exports, one server), `auth` (the
bearer token), `metrics` (Prometheus), `batching` (shared onnxruntime calls) and `limits`/`bounded`
(what one client may make the server hold); `serving.signing` says who vouches for an export's
manifest (a signature, or the registry); `serving.ray_app` its Ray Serve deployment.
"""
