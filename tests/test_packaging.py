"""The repository's kernels/ folder is ddim_fast.kernels; on sys.path as a top-level ``kernels``
(``python -m pytest`` or a script run from the repository root) it must not shadow the PyPI
package of that name, which transformers requires and diffusers imports."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, *extra_path, cwd):
    # -S: no site-packages, so only the paths named here can provide a top-level ``kernels``
    setup = f"import sys; sys.path[:0] = [{REPO!r}]; sys.path += {list(map(str, extra_path))!r}\n"
    return subprocess.run([sys.executable, "-S", "-c", setup + code], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_top_level_kernels_hands_over_to_the_installed_package(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    proc = _run("import kernels; print(kernels.WHO, kernels.__file__)", site, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["installed", str(site / "kernels" / "__init__.py")]
    # the name is the installed package's from then on
    proc = _run("import kernels, sys, importlib; importlib.import_module('kernels'); print(sys.modules['kernels'].WHO)", site, cwd=tmp_path)
    assert proc.stdout.strip() == "installed", proc.stderr


def test_top_level_kernels_without_an_installed_package_is_a_missing_module(tmp_path):
    proc = _run(
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name, 'ddim_fast.kernels' in str(e))",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["missing", "kernels", "True"]


def test_the_triton_kernels_are_ddim_fast_kernels():
    import ddim_fast.kernels

    assert os.path.samefile(ddim_fast.kernels.__file__, os.path.join(REPO, "kernels", "__init__.py"))
    assert ddim_fast.kernels.__name__ == "ddim_fast.kernels"
