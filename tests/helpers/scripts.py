"""The repository's top-level scripts (sample.py, ...) as modules, for tests that call their `main`."""
import importlib.util
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """<repo>/<name>.py imported as the module `<name>_cli`."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
