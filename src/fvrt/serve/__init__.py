"""`fvrt-serve`: engines served over HTTP by Ray Serve, one warm pipeline per replica (docs/serving.md).

`requests` checks an HTTP request body with the CLI's checks; `store` keeps the results; `replica` is one warm
`Pipeline` doing the `fvrt-run --batch` path (usable without Ray); `app` is the FastAPI ingress and the Ray Serve
deployments; `cli` starts it all.
"""
