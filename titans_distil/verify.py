"""Checks that an export stands on its own: its model files import nothing but torch, transformers and the
standard library (`foreign_imports`), the sha256 of its files (`file_hashes`), and loading it in a separate
Python that cannot import titans-distil (`run_isolated`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import UserError


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file in `folder` (relative posix path -> hex digest), sorted by path."""
    root = Path(folder)
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(p for p in root.rglob("*") if p.is_file())
    }


def foreign_imports(folder: str | os.PathLike) -> list[str]:
    """Imports in the folder's .py files that are neither torch, transformers, the stdlib nor a sibling
    file."""
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "__future__"}
    bad = []
    for path in sorted(Path(folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: must name a sibling file
                    target = (node.module or "").split(".")[0]
                    if target and not (Path(folder) / f"{target}.py").is_file():
                        bad.append(f"{path.name}: from .{node.module} (no such file)")
                    continue
                names = [node.module or ""]
            else:
                continue
            bad += [f"{path.name}: {name}" for name in names if name.split(".")[0] not in allowed]
    return bad


# Runs in a fresh interpreter that can see torch and transformers but not titans-distil: loads the export the
# way a user would and writes its logits (and generations) for the parent to compare.
ISOLATED_CHILD = r"""
import importlib.util, json, os, sys
args = json.loads(sys.argv[1])
# the folders from which `import titans_distil` / `models` works
hidden = {os.path.realpath(p) for p in args["hide"]}
def _editable(finder):
    return (getattr(finder, "__module__", "") or "").startswith("__editable__")
sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) not in hidden]
sys.path_importer_cache.clear()
class _Blocker:  # a plain (non-editable) install sits in site-packages beside torch: block it by name instead
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "titans_distil" or name.startswith("titans_distil."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while verifying the export)")
        return None
report = {"titans_distil_on_path": importlib.util.find_spec("titans_distil") is not None}
sys.meta_path.insert(0, _Blocker)
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
trust = args["trust_remote_code"]
model = AutoModelForCausalLM.from_pretrained(args["export"], trust_remote_code=trust).eval()
AutoTokenizer.from_pretrained(args["export"], trust_remote_code=trust)
report["class"] = type(model).__module__ + "." + type(model).__name__
ids = torch.tensor(args["ids"])
with torch.no_grad():
    logits = model(ids, use_cache=False).logits
save_file({"logits": logits.float().contiguous()}, args["logits_out"])
report["generated"] = {}
for rule in args["rules"]:
    extra = {} if rule is None else {"update_rule": rule}
    out = model.generate(ids[:1], max_new_tokens=args["new_tokens"], do_sample=False, **extra)
    report["generated"][str(rule)] = out[0, ids.shape[1]:].tolist()
print(json.dumps(report))
"""


def project_paths() -> list[str]:
    """The source checkout holding titans_distil/ (and models/), which must not be on the child's sys.path. A
    plain install lives in site-packages beside torch instead; the child then blocks the package by name."""
    root = Path(__file__).resolve().parent.parent
    return [] if root.name in ("site-packages", "dist-packages") else [str(root)]


def run_isolated(
    export_dir: Path, ids, *, trust_remote_code: bool, rules, new_tokens: int, workdir: Path
) -> tuple[dict, object]:
    """Load the export in a child interpreter that cannot import titans-distil; return (report, logits)."""
    from safetensors.torch import load_file

    logits_out = Path(workdir) / "isolated_logits.safetensors"
    args = {
        "export": str(Path(export_dir).resolve()),
        "ids": ids.tolist(),
        "trust_remote_code": trust_remote_code,
        "rules": list(rules),
        "new_tokens": new_tokens,
        "logits_out": str(logits_out),
        "hide": project_paths(),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        HF_MODULES_CACHE=str(Path(workdir) / "modules"),
    )  # fresh copy of the code
    proc = subprocess.run(
        [sys.executable, "-c", ISOLATED_CHILD, json.dumps(args)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0:
        error = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise UserError(
            "the export does not load without titans-distil "
            f"({error[-1] if error else 'exit ' + str(proc.returncode)}); re-export it"
        )
    return json.loads(last), load_file(str(logits_out))["logits"]
