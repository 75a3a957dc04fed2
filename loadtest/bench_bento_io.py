"""The alternative the request-path issue asked to measure: BentoML's own I/O descriptors in front of the same serving
pipeline, with none of braintumor's HTTP code (no GatewayMiddleware guard and multipart parser, no pre-parsed input,
no API keys, body limits, metrics or access log): BentoML parses the multipart upload into a temporary file (its
``Path`` descriptor), validates the fields and serialises the returned dict itself. bench_gateway.py ``--bento-io``
runs it beside `braintumor serve`, against the same Triton, and sends its HTTP line here.

    BRAINTUMOR_TRITON_URL=HOST:PORT BRAINTUMOR_TRITON_KEY=... \\
        bentoml serve braintumor.loadtest.bench_bento_io:DescriptorGateway --port 3100

For measurement only: it answers /analyze as the gateway does, but without the gateway's guards it must never
face a network.
"""

from __future__ import annotations

from pathlib import Path

import bentoml

from braintumor.serving.pipeline import Pipeline
from braintumor.serving.request import AnalyzeOptions
from braintumor.serving.settings import ServeSettings
from braintumor.serving.wire import analysis_to_dict


@bentoml.service(name="bench-bento-io", workers=1, metrics={"enabled": False}, logging={"access": {"enabled": False}})
class DescriptorGateway:
    def __init__(self) -> None:
        self.pipeline = Pipeline.from_settings(ServeSettings.from_env())

    async def __is_ready__(self) -> bool:
        return await self.pipeline.ready()

    @bentoml.api(route="/analyze")
    async def analyze(self, image: Path, heatmap: bool = False, overlay: bool = False,
                      mask_format: str = "png") -> dict:
        result = await self.pipeline.analyze(image.read_bytes(), AnalyzeOptions(heatmap, overlay, mask_format))
        return analysis_to_dict(result)
