"""The package as users install it: built into a wheel, installed into a folder of its own, used from there."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# run from the installed copy only: export (the model card needs the template, package data), reload, compare
USE_INSTALLED = textwrap.dedent("""
    import sys
    from pathlib import Path

    import timm
    import torch

    import ncl_hub

    site, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    assert Path(ncl_hub.__file__).resolve().is_relative_to(site), ncl_hub.__file__
    model = ncl_hub.create_model("resnet8_cifar_tiny", num_classes=3, num_experts=2).eval()
    folder = ncl_hub.hub.save_pretrained(model, out / "export", class_names=["a", "b", "c"], class_counts=[9, 4, 1])
    card = (folder / "README.md").read_text()
    assert "resnet8_cifar_tiny" in card and "Nested Collaborative Learning" in card, card[:500]
    x = torch.randn(2, 3, 32, 32)
    for loaded in (ncl_hub.hub.load_model(f"local-dir:{folder}"),
                   timm.create_model(f"local-dir:{folder}", pretrained=True)):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model(x))
    print("installed copy OK:", ncl_hub.__file__)
""")


def _pip(*args, cwd):
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_wheel_installs_and_exports_without_the_checkout(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build writes nothing into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "ncl_hub", src / "ncl_hub", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src), cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("ncl_hub-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "ncl_hub/templates/ncl_model_card.md" in names and not any(".data/" in n for n in names)
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", USE_INSTALLED, str(site), str(tmp_path / "out")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installed copy OK" in proc.stdout


def test_one_card_template():
    """model_cards/ncl_model_card.md, the template people find in the repository, is the package's own file."""
    shown, shipped = REPO / "model_cards" / "ncl_model_card.md", REPO / "ncl_hub" / "templates" / "ncl_model_card.md"
    assert shown.resolve() == shipped.resolve()
