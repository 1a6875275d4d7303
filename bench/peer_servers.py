"""The default model behind the serving frameworks a user would reach for instead of this service,
for `python -m bench.peers` (run in bench/.peers-venv; see `make bench-peers`).

    python -m bench.peer_servers litserve --port 8101 --artifacts model_artifacts/default
    python -m bench.peer_servers pytriton --port 8102 --artifacts model_artifacts/default
    python -m bench.peer_servers ray --port 8103 --artifacts model_artifacts/default

Each one serves POST /caption with a multipart `image` upload, as this service does, and answers
{"caption": text}. Fair settings for all: the project's own compiled batch captioner
(Captioner.caption) inside the framework's batch handler, batch 32, 5 ms batch wait, the same
TensorFlow intra-op thread count as the service (CPUs - 1), PNG decoding in the request path.
"""

import argparse
import io
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

MAX_BATCH = 32
BATCH_WAIT_S = 0.005


def load_captioner(artifacts: str):
    import tensorflow as tf

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    tf.config.threading.set_intra_op_parallelism_threads(max(1, cpus - 1))
    from captioning.artifacts import bundle_path
    from captioning.captioner import Captioner

    # The service's encoder: bench.peers sets ENCODER_PRECISION (and oneDNN) for every server alike.
    # A model's directory of versions (the default) means its highest version, as the service serves.
    captioner = Captioner.load(bundle_path(artifacts), encoder_precision=os.environ.get("ENCODER_PRECISION"))
    captioner.warmup()
    return captioner


def decode_png(data: bytes, captioner):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return captioner.prepare(image)


try:  # LitServe spawns its workers and pickles the API: the class must live at module level
    import litserve as ls
except ImportError:  # the service's own environment; only the peers' virtualenv has LitServe
    ls = None

if ls is not None:

    class LitCaptionAPI(ls.LitAPI):
        def setup(self, device):
            self.captioner = load_captioner(os.environ["PEER_ARTIFACTS"])

        def decode_request(self, request):  # the multipart form, as LitServe parses it
            return decode_png(request["image"].file.read(), self.captioner)

        def predict(self, images):
            return [captions[0].text for captions in self.captioner.caption(images, batch_size=MAX_BATCH)]

        def encode_response(self, text):
            return {"caption": text}


def serve_litserve(port: int, artifacts: str) -> None:
    os.environ["PEER_ARTIFACTS"] = artifacts
    api = LitCaptionAPI(max_batch_size=MAX_BATCH, batch_timeout=BATCH_WAIT_S, api_path="/caption")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(port=port, host="127.0.0.1", generate_client_file=False, log_level="warning")


def serve_pytriton(port: int, artifacts: str) -> None:
    import numpy as np
    import uvicorn
    from fastapi import FastAPI, UploadFile
    from pytriton.client import AsyncioModelClient
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    captioner = load_captioner(artifacts)

    @batch
    def infer(images):
        texts = [captions[0].text for captions in captioner.caption(list(images), batch_size=MAX_BATCH)]
        return {"caption": np.array([[t.encode()] for t in texts], dtype=object)}

    size = captioner.config.image_size
    triton = Triton(
        config=TritonConfig(
            http_address="127.0.0.1",
            http_port=port + 1000,
            grpc_address="127.0.0.1",
            grpc_port=port + 2000,
            metrics_port=port + 3000,
            allow_metrics=False,
        )
    )
    triton.bind(
        model_name="captioner",
        infer_func=infer,
        inputs=[Tensor(name="images", dtype=np.uint8, shape=(size, size, 3))],
        outputs=[Tensor(name="caption", dtype=bytes, shape=(1,))],
        config=ModelConfig(
            max_batch_size=MAX_BATCH, batcher=DynamicBatcher(max_queue_delay_microseconds=int(BATCH_WAIT_S * 1e6))
        ),
        strict=False,
    )
    triton.run()
    app = FastAPI()
    clients: dict[str, AsyncioModelClient] = {}

    @app.post("/caption")
    async def caption(image: UploadFile):
        if "client" not in clients:
            clients["client"] = AsyncioModelClient(
                f"grpc://127.0.0.1:{port + 2000}", "captioner", inference_timeout_s=60
            )
        pixels = decode_png(await image.read(), captioner)
        result = await clients["client"].infer_sample(images=pixels)
        return {"caption": result["caption"][0].decode()}

    @app.get("/health/ready")
    async def ready():
        return {"ready": True}

    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    finally:
        triton.stop()


def serve_ray(port: int, artifacts: str) -> None:
    """Ray Serve: one replica with `@serve.batch`. max_ongoing_requests is raised from its default
    (5), which would cap a batch at 5 requests; the replica asks for no whole CPU, so Ray starts it
    on a 2-core machine beside its own processes."""
    import signal
    import threading

    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
    class RayCaptioner:
        def __init__(self, artifacts: str):
            self.captioner = load_captioner(artifacts)

        @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
        async def caption(self, images: list) -> list[str]:
            return [captions[0].text for captions in self.captioner.caption(images, batch_size=MAX_BATCH)]

        async def __call__(self, request: Request) -> JSONResponse:
            # A Response, not a dict: its Content-Length reaches the client (a dict is sent chunked).
            if request.method == "GET":  # readiness: the route answers once the replica is up
                return JSONResponse({"ready": True})
            form = await request.form()
            pixels = decode_png(await form["image"].read(), self.captioner)
            return JSONResponse({"caption": await self.caption(pixels)})

    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(RayCaptioner.bind(artifacts), route_prefix="/caption")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_servers", description=__doc__.split("\n\n")[0])
    parser.add_argument("framework", choices=["litserve", "pytriton", "ray"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--artifacts", default="model_artifacts/default")
    args = parser.parse_args()
    servers = {"litserve": serve_litserve, "pytriton": serve_pytriton, "ray": serve_ray}
    servers[args.framework](args.port, args.artifacts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
