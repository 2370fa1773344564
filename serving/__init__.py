"""Deployment of exported single-logit models with onnxruntime.

Imports numpy, onnxruntime, Pillow and (for HTTP) FastAPI only, never torch, `slc` or `pipeline`, so a
deployment image stays small. `serving.model.SingleLogitModel` is the library; `serving.cli` the
`slc` command; `serving.http` the HTTP app; `serving.ray_app` its Ray Serve deployment.
"""
