"""Beyond one device through transformers' and accelerate's own engines: `device_map` with CPU and disk offload, and
tensor parallelism (`tp_plan="auto"` under torchrun; two CPU processes over gloo here)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import nemotron_diffusion  # noqa: F401  (registers the model type)
from conftest import left_pad, tiny_model


MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def generate_all(model, input_ids=PROMPT, attention_mask=None, **kwargs):
    out = {}
    with torch.no_grad():
        for mode in MODES:
            out[mode] = model.generate(
                input_ids, attention_mask=attention_mask, max_new_tokens=12, decode_mode=mode, block_size=4, **kwargs
            ).tolist()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model()
    folder = tmp_path_factory.mktemp("dm") / "tiny"
    model.save_pretrained(folder)
    return model, folder


def test_declared_split_and_tp_plans():
    model = tiny_model()
    assert set(model._no_split_modules) == {"NemotronDiffusionDecoderLayer"}
    plan = model._tp_plan
    assert plan["diffusion_head"] == "colwise_gather_output"
    # the config's backbone plan (keyed `layers.*`) is prefixed with our backbone's name, `encoder`
    for suffix, style in nemotron_diffusion.NemotronDiffusionConfig.base_model_tp_plan.items():
        assert plan[f"encoder.{suffix}"] == style
    named = dict(model.named_modules())
    for key in plan:
        concrete = key.replace("*", "0")
        assert concrete in named, f"tp_plan key {key!r} names no module"


def test_cpu_and_disk_offload_every_mode(saved, tmp_path):
    model, folder = saved
    expected = generate_all(model)
    device_map = {
        "encoder.embed_tokens": "cpu", "encoder.rotary_emb": "cpu", "encoder.layers.0": "cpu",
        "encoder.layers.1": "disk", "encoder.norm": "disk", "diffusion_head": "disk",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "off")
    assert set(offloaded.hf_device_map.values()) == {"cpu", "disk"}
    assert offloaded.encoder.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really on disk
    assert generate_all(offloaded.eval()) == expected


def test_device_map_auto_with_a_memory_budget(saved, tmp_path):
    """device_map="auto" with a CPU budget smaller than the model: accelerate puts the rest on disk."""
    model, folder = saved
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    auto = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tmp_path / "off"
    ).eval()
    assert set(auto.hf_device_map.values()) == {"cpu", "disk"}, auto.hf_device_map
    # no decoder layer is split across devices (`_no_split_modules`)
    assert all(not key.startswith("encoder.layers.0.") for key in auto.hf_device_map)
    assert generate_all(auto) == generate_all(model)
    # padded batches and sampling go through the same hooks
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]])
    assert generate_all(auto, ids, mask) == generate_all(model, ids, mask)
    for mode in ("diffusion", "linear_spec"):
        torch.manual_seed(3)
        a = auto.generate(PROMPT, max_new_tokens=8, decode_mode=mode, block_size=4, do_sample=True)
        torch.manual_seed(3)
        b = model.generate(PROMPT, max_new_tokens=8, decode_mode=mode, block_size=4, do_sample=True)
        assert a.tolist() == b.tolist(), mode


TP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import nemotron_diffusion
    from transformers import AutoModelForCausalLM

    if sys.argv[3] == "tp_plan":
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto").eval()
    else:  # the spelling transformers recommends since 5.x
        from transformers import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], distributed_config=DistributedConfig(tp_plan="auto"))
        model.eval()
    q = model.encoder.layers[0].self_attn.q_proj.weight
    head = model.diffusion_head.weight
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    tokens = {}
    with torch.no_grad():
        for mode in ("ar", "diffusion", "linear_spec", "quadratic_spec"):
            tokens[mode] = model.generate(ids, max_new_tokens=12, decode_mode=mode, block_size=4).tolist()
    with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ["RANK"]), "w") as f:
        json.dump({
        "rank": int(os.environ["RANK"]), "tp_size": model.tp_size,
        "q_local": list(q.to_local().shape), "q_global": list(q.shape),
        "head_local": list(head.to_local().shape), "tokens": tokens,
        }, f)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["tp_plan", "distributed_config"])
def test_tensor_parallel_under_torchrun_on_cpu(saved, tmp_path, spelling):
    """`tp_plan="auto"` shards the model over two gloo processes on CPU; every mode gives the unsharded tokens."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    model, folder = saved
    expected = generate_all(model)
    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        [*command, "--standalone", "--nproc_per_node", "2", str(script), str(folder), str(tmp_path), spelling],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    config = model.config
    for r in results:
        assert r["tp_size"] == 2
        assert r["q_global"] == [config.num_attention_heads * config.head_dim, config.hidden_size]
        assert r["q_local"] == [config.num_attention_heads * config.head_dim // 2, config.hidden_size]  # sharded
        assert r["head_local"] == [config.vocab_size // 2, config.hidden_size]
        assert r["tokens"] == expected
