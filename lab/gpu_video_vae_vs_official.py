"""Full-size video VAE on GPU, bf16: fvrt vs official ltx-core (random weights): parity, peak memory, time."""

import json
import sys
import time

import torch
from ltx_core.model.video_vae import VideoDecoderConfigurator, VideoEncoderConfigurator

from fvrt.builder.checkpoint import ModelVersion, stage_spec
from fvrt.builder.configs import full_config

dev = torch.device("cuda")
res = {}


def measure(fn, x):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        y = fn(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        y = fn(x)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    return y, dt, (torch.cuda.max_memory_allocated() - base) / 2**30


only = sys.argv[2:]
for v in ModelVersion:
    cfg = full_config(v)
    for stage, conf, shape in (
        ("video_decoder", VideoDecoderConfigurator, (1, 128, 16, 34, 60)),
        ("video_encoder", VideoEncoderConfigurator, (1, 3, 1, 1088, 1920)),
        ("video_encoder", VideoEncoderConfigurator, (1, 3, 121, 1088, 1920)),
    ):
        off = conf.from_config(cfg).to(torch.float32)
        stage_spec(stage).randomize(off, torch.Generator().manual_seed(0))
        off = off.to(dev, torch.bfloat16).eval()
        with torch.device("meta"):
            ours = stage_spec(stage).build(cfg)
        ours.load_state_dict(off.state_dict(), assign=True)
        ours.eval()
        gen = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16)
        if stage == "video_encoder":
            x = x.clamp(-1, 1)
        y_o, t_o, m_o = measure(off, x)
        y_f, t_f, m_f = measure(ours, x)
        err = float((y_f.double() - y_o.double()).norm() / y_o.double().norm())
        key = f"{v.value} {stage} {list(shape)}"
        res[key] = dict(
            rel_err=err,
            out=list(y_f.shape),
            official_s=round(t_o, 3),
            fvrt_s=round(t_f, 3),
            official_peak_gib=round(m_o, 2),
            fvrt_peak_gib=round(m_f, 2),
        )
        print(key, res[key], flush=True)
        del off, ours, y_o, y_f, x
print(torch.cuda.get_device_name(), torch.__version__)
json.dump(res, open(sys.argv[1], "w"), indent=1)
