"""The HTTP service (`recon-run serve`): a FastAPI app over one `Reconstructor`, its batcher, and its client.

Needs the `serve` extra (fastapi, uvicorn, prometheus-client, python-multipart; httpx for the
client); `ray_serve` also needs the `ray` extra. Nothing outside this package imports it unless it
serves or is a client, so `import recon_runtime` stays lean.
"""
