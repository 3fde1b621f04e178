"""make demo's machinery: allatonce.yaml's run block, as written, twice on one S3 server.

The first run imports, pretokenizes, trains and publishes; the second finds every step
done and writes nothing."""

import json

from conftest import bucket_objects

from demo import run as demo

DONE = f"done/{demo.MODEL_NAME}/{demo.DATASET_NAME}"


def test_the_run_block_trains_and_a_rerun_writes_nothing(s3, proxy, tmp_path):
    inputs = demo.make_inputs(tmp_path / "inputs", rows=240)
    env = demo.demo_env(s3["AWS_ENDPOINT_URL_S3"], s3["BUCKET_NAME"], inputs, tmp_path,
                        SHARD_SIZE="100")  # 3 shards

    first = demo.run_task(env, capture_output=True, text=True, timeout=900)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output[-5000:]
    objects = bucket_objects(s3)
    done = json.loads(objects[f"{DONE}/_manifest.json"])
    assert done["complete"] and done["rows"] > 0
    assert f"{DONE}/fused/config.json" in objects and f"{DONE}/lora_model/adapter_config.json" in objects
    assert demo.SETTINGS["SAMPLE_PROMPT"] in output and repr(done["sample"]["completion"]) in output
    # the run's log ends with the evaluation loss before and after training
    before, after = done["eval_loss"]["before"], done["eval_loss"]["after"]
    last_line = first.stdout.strip().splitlines()[-1]
    assert f"held-out rows: {before:.4f} before training, {after:.4f} after" in last_line
    assert demo.CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in output
    lines = dict(zip([what for what, _ in demo.OUTPUTS],
                     demo.describe_outputs(s3["AWS_ENDPOINT_URL_S3"], s3["BUCKET_NAME"])))
    for what, line in lines.items():
        assert ", complete" in line, line
    fused = demo.copy_fused(s3["AWS_ENDPOINT_URL_S3"], s3["BUCKET_NAME"], tmp_path / "fused")
    assert (fused / "config.json").read_bytes() == objects[f"{DONE}/fused/config.json"]

    second = demo.run_task({**env, "AWS_ENDPOINT_URL_S3": proxy.url}, capture_output=True,
                           text=True, timeout=900)
    assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
    assert proxy.writes() == []
    assert bucket_objects(s3) == objects
