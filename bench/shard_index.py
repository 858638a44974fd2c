"""Reading the samples of WebDataset shards in S3 before training: scanning each shard's tar
headers (the naive way, and what a shard without an index gets) against reading the shards'
indexes that `audiorl data index` writes (one small object per shard), interleaved over rounds.
The store is moto's S3 server on 127.0.0.1, so there is no network latency or bandwidth limit in
it: against a real object store the scan costs more, since it fetches every shard whole.

    python bench/shard_index.py                        # 8 shards of 400 espeak-ng clips, 5 rounds
    python bench/shard_index.py --shards 4 --per-shard 100 --rounds 2
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _interleave import add_arguments, interleave, print_table
from eval_throughput import SENTENCES, VOICES  # the same espeak-ng speech


def write_shards(root: Path, shards: int, per_shard: int) -> list[Path]:
    from audiorl.data.speech import speak

    spoken = []
    for v, voice in enumerate(VOICES):
        for s, sentence in enumerate(SENTENCES):
            spoken.append((speak(sentence, root / "spoken" / f"{v}-{s}.wav", voice=voice).read_bytes(), sentence))
    paths = []
    for n in range(shards):
        paths.append(root / f"train-{n:06d}.tar")
        with tarfile.open(paths[-1], "w") as tar:
            for i in range(per_shard):
                audio, sentence = spoken[(n * per_shard + i) % len(spoken)]
                for name, data in ((f"utt{i:05d}.wav", audio), (f"utt{i:05d}.txt", sentence.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=400)
    add_arguments(parser, rounds=5, warmup=1)
    args = parser.parse_args()
    os.environ.setdefault("AUDIORL_NO_PROGRESS", "1")
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    from audiorl.data.builders import index_shards
    from audiorl.data.records import read_records

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        client = boto3.client("s3")
        with tempfile.TemporaryDirectory() as tmp:
            shards = write_shards(Path(tmp), args.shards, args.per_shard)
            client.create_bucket(Bucket="scan")
            client.create_bucket(Bucket="indexed")
            for shard in shards:
                client.upload_file(str(shard), "scan", shard.name)
                client.upload_file(str(shard), "indexed", shard.name)
        pattern = f"train-{{000000..{args.shards - 1:06d}}}.tar"
        index_shards([f"s3://indexed/{pattern}"])
        sizes = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket="indexed")["Contents"]}
        shard_bytes = sum(v for k, v in sizes.items() if k.endswith(".tar"))
        index_bytes = sum(v for k, v in sizes.items() if k.endswith(".index.json"))

        def read(bucket):
            def run():
                s3fs.S3FileSystem.clear_instance_cache()  # no cached blocks or listings between rounds
                records = read_records(f"s3://{bucket}/{pattern}", "transcript")
                assert len(records) == args.shards * args.per_shard
            return run

        scan, indexed = "scan the tar headers", "read the indexes"
        times = interleave({scan: read("scan"), indexed: read("indexed")}, args.rounds, warmup=args.warmup, shuffle=args.shuffle)
    finally:
        server.stop()
    print(f"{args.shards} shards of {args.per_shard} clips in S3 (moto on 127.0.0.1): {shard_bytes / 2**20:.1f} MiB of shards, "
          f"{index_bytes / 2**20:.2f} MiB of indexes; {args.rounds} rounds:")
    print_table(times, scan, unit="s", label="read every sample's place")


if __name__ == "__main__":
    main()
