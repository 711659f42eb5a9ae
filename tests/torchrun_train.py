"""Run the training engine on a tiny OLMoE, for tests that start it under torchrun.

``python torchrun_train.py SPEC.json``; the spec has ``tokens`` ({lang: parquet}), ``settings``
(TrainSettings keys), ``state_dir``, ``out`` (the model exported at the last step, staged and then
published as the stages do) and ``stop_after`` (null, or stop after that many steps as a killed job
would). The main process writes ``{"resumed_from": ..., "log": [...]}`` to ``<out>.json``.
"""

import json
import sys
from pathlib import Path

from families import tiny_model

from moelang.cli import end_distributed
from moelang.train import PackedStream, TrainSettings, export_model, publish, staged_path, train

EOS = 2


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    settings = TrainSettings.from_dict(spec["settings"])
    model = tiny_model("olmoe", seed=3)
    stream = PackedStream(spec["tokens"], settings.mixture, settings.seq_len, EOS, settings.seed)
    staged = staged_path(spec["state_dir"], "model")
    exports = {settings.steps: lambda m, sd: export_model(m, None, staged, state_dict=sd)}
    result = train(model, stream, settings, spec["state_dir"], export_steps=exports, stop_after=spec["stop_after"])
    from accelerate import PartialState

    if PartialState().is_main_process and spec["stop_after"] is None:
        publish(spec["state_dir"], {"model": spec["out"]})
        Path(f"{spec['out']}.json").write_text(json.dumps({"resumed_from": result.resumed_from, "log": result.log}))
    end_distributed()  # as the CLI does after every command


if __name__ == "__main__":
    main(sys.argv[1])
