"""The README's main job (examples/digits_demo.py, run by ``make demo``) runs end to end (quick settings)."""
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "digits_demo.py"


def test_demo_quick():
    r = subprocess.run([sys.executable, str(DEMO), "--quick"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "verify OK" in out
    assert "B + pi(tau): transfusion" in out and "B + tau (no alignment)" in out
    rows = [line for line in out.splitlines() if line.startswith("B + pi(tau)")]
    assert len(rows) == 5


def test_optional_timm_vit_is_sound():
    import pytest

    timm = pytest.importorskip("timm")
    import torch

    import permgraph as pg

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=5, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = pg.compile(model, (x,))
    assert pg.verify(model, spec, (x,), tolerance=1e-12).ok
    assert any(g.role == "heads" for g in spec.groups.values())
