"""The naive baseline of bench_gateway.py: how most BRISC projects serve, one web process holding the eager PyTorch
model and answering each request with ``model(x)`` (a sync Starlette handler on uvicorn, i.e. FastAPI's default),
with our decoding, preprocessing and postprocessing into the same JSON.

    python -m braintumor.loadtest.bench_baseline --checkpoint RUN/release.pt --port 3401
"""

from __future__ import annotations

import argparse


def baseline_app(checkpoint: str):
    import torch
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from braintumor.export.contract import FULL_OUTPUTS
    from braintumor.export.model_contract import ModelContract
    from braintumor.export.wrappers import build_graphs
    from braintumor.serving.postprocess import postprocess
    from braintumor.serving.request import AnalyzeOptions
    from braintumor.serving.wire import analysis_to_dict
    from braintumor.train.decode import decode_any
    from braintumor.train.preprocess import preprocess
    from braintumor.train.trainer.checkpoint import load_model

    model, state = load_model(checkpoint)
    graph = build_graphs(model, state)["full"].eval()
    deployed = ModelContract.from_checkpoint(state)  # classes, preprocessing and refer rules, as exported
    cfg = deployed.preprocess

    def work(data: bytes, heatmap: bool) -> dict:
        decoded, _ = decode_any(data)
        image, geometry = preprocess(decoded.pixels, cfg)
        with torch.inference_mode():
            outs = graph(torch.from_numpy(image[None, None]))
        outputs = {name: out.numpy() for name, out in zip(FULL_OUTPUTS, outs)}
        result = postprocess(outputs, geometry, decoded, classes=deployed.classes, rules=deployed.refer_rules,
                             options=AnalyzeOptions(heatmap=heatmap))
        return analysis_to_dict(result, model=False)

    async def analyze(request: Request) -> JSONResponse:
        form = await request.form()
        data = await form["image"].read()
        heatmap = str(form.get("heatmap", "false")).lower() == "true"
        # What FastAPI does with a plain `def` endpoint: the model call runs in the thread pool, one request each.
        return JSONResponse(await run_in_threadpool(work, data, heatmap))

    async def ready(_request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    return Starlette(routes=[Route("/analyze", analyze, methods=["POST"]), Route("/readyz", ready)])


def run_baseline_server(checkpoint: str, port: int) -> None:
    import uvicorn

    uvicorn.run(baseline_app(checkpoint), host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the checkpoint to serve eagerly")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    run_baseline_server(args.checkpoint, args.port)


if __name__ == "__main__":
    main()
