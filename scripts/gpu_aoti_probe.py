"""Does any AOTInductor artifact load on this GPU machine? (torch 2.11 segfaults loading .pt2 packages here.)
Variant "so": torch._inductor.aot_compile without packaging -> a shared library -> torch._export.aot_load."""

import subprocess
import sys

CODE = r"""
import sys, torch
from torch import nn
variant = sys.argv[1]
m = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).cuda().eval()
x = torch.randn(8, 64, device="cuda")
with torch.no_grad():
    if variant == "so":
        so = torch._inductor.aot_compile(torch.export.export(m, (x,)).module(), (x,))
        print("PROBE compiled", so, flush=True)
        f = torch._export.aot_load(so, "cuda")
        print("PROBE loaded", flush=True)
        print("PROBE ran", float((f(x) - m(x)).abs().max()), flush=True)
    elif variant == "runner":
        so = torch._inductor.aot_compile(torch.export.export(m, (x,)).module(), (x,))
        r = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda")
        print("PROBE runner loaded", flush=True)
"""
for v in sys.argv[1:] or ["so"]:
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CODE, v], capture_output=True, text=True)
    print(v, "rc", r.returncode, [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")], r.stderr[-600:])
