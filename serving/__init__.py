"""Deployment of exported single-logit models with onnxruntime.

Imports numpy, onnxruntime, Pillow and (for HTTP) FastAPI only, never torch, `slc` or `pipeline`, so a
deployment image stays small. `serving.model.SingleLogitModel` is the library; `serving.cli` the
`slc` command; `serving.http` the HTTP app, with `runs` (many exports, one server), `auth` (the
bearer token), `metrics` (Prometheus) and `batching` (shared onnxruntime calls); `serving.ray_app`
its Ray Serve deployment.
"""
