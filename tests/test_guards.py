"""Bad input and failed writes: a non-zero exit, one line naming the flag or file, nothing written — and
checked before any rendering."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnmod import guards
from attnmod.cli import main

TINY = ["--model", "tiny", "--steps", "2"]


def run(args, capsys):
    """``attnmod ARGS`` in-process: (exit code, stderr). argparse errors exit through SystemExit."""
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("args, says", [
    (["--steps", "0"], "argument --steps: expected a whole number >= 1, got '0'"),
    (["--guidance", "nan"], "argument --guidance: guidance must be a finite number >= 0"),
    (["--guidance=-3"], "argument --guidance: guidance must be a finite number >= 0"),
    (["--seed", "18446744073709551616"], "argument --seed: a seed is a whole number from 0 to 2**64 - 1"),
    (["--seed", "two"], "argument --seed: a seed is a whole number, got 'two'"),
])
def test_bad_numbers_are_refused_at_parse_time(args, says, tmp_path, capsys):
    code, err = run(["generate", *TINY, "--prompt", "a red cat", *args, "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and says in err
    assert files(tmp_path) == []


@pytest.mark.parametrize("args, says", [
    (["--tile-px=-5"], "argument --tile-px: expected a whole number >= 1, got '-5'"),
    (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1"),
    (["--seed", "0:1:3"], "--seed values must be whole numbers; the range gives 0.5"),
    (["--seed", "18446744073709551616"], "a seed is a whole number from 0 to 2**64 - 1"),
    (["--start=-1000:1000:100000"], "this is a large job: 100,001 images x 2 steps"),
])
def test_bad_scan_arguments(args, says, tmp_path, capsys):
    out = tmp_path / "scan"
    code, err = run(["scan", *TINY, "--prompt", "a red cat", "--block", "U1A1A2", *args, "--out", str(out)], capsys)
    assert code == 2 and says in err, err
    assert not out.exists()


def test_candidate_batch_zero_is_refused(tmp_path, capsys):
    code, err = run(["strategy", *TINY, "--prompt", "a red cat", "--candidate-batch", "0",
                     "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "argument --candidate-batch: expected a whole number >= 1" in err


def test_reweight_with_a_bad_number_names_the_flag(tmp_path, capsys):
    code, err = run(["edit", *TINY, "--prompt", "a red cat", "--to", "a red dog", "--reweight", "red=abc",
                     "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "--reweight 'red=abc': 'abc' is not a number" in err
    assert files(tmp_path) == []


def test_output_locations_are_checked_before_rendering(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("keep me")
    cases = [
        (["generate", "--out", str(tmp_path / "o.jpg")], "attnmod writes .png files"),
        (["generate", "--out", str(tmp_path / "folder")], "is a folder; give a file name"),
        (["generate", "--out", str(tmp_path / "file.txt" / "o.png")], "file.txt is a file, not a folder"),
        (["strategy", "--out", str(tmp_path / "folder")], "is a folder"),
        (["scan", "--block", "U1A1A2", "--out", str(tmp_path / "file.txt")], "file.txt is a file; --out names a folder"),
        (["maps", "--out", str(tmp_path / "file.txt" / "m")], "is inside the file"),
        (["influence", "--out", str(tmp_path / "file.txt")], "--out names a folder"),
        (["edit", "--to", "a red dog", "--out", str(tmp_path / "file.txt")], "--out names a folder"),
        (["style", "--out", str(tmp_path / "file.txt")], "--out names a folder"),
    ]
    for args, says in cases:
        code, err = run([args[0], *TINY, "--prompt", "a red cat", *args[1:]], capsys)
        assert code == 2 and says in err, (args, err)
        assert err.count("\n") == 1, err
    assert files(tmp_path) == ["file.txt", "folder"] and (tmp_path / "file.txt").read_text() == "keep me"


def test_unknown_and_missing_devices_list_what_exists(tmp_path, capsys):
    code, err = run(["generate", *TINY, "--prompt", "a red cat", "--device", "quantum",
                     "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "--device 'quantum' is not a device; this machine has: cpu" in err
    import torch

    if not torch.cuda.is_available():
        code, err = run(["generate", *TINY, "--prompt", "a red cat", "--device", "cuda",
                         "--out", str(tmp_path / "o.png")], capsys)
        assert code == 2 and "--device 'cuda' is not available (this torch build has no CUDA)" in err
    assert guards.check_device("cpu") == "cpu" and guards.check_device(None) is None


def test_the_embedded_model_reads_its_grammar_only(tmp_path, capsys):
    code, err = run(["generate", "--prompt", "a purple large triangle", "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "cannot parse clause 'a purple large triangle'" in err
    out = tmp_path / "ok.png"
    code, _ = run(["generate", "--prompt", "a large purple triangle in the center.", "--steps", "2",
                   "--out", str(out)], capsys)
    from attnmod.recipe import Recipe

    assert code == 0 and Recipe.from_png(out).prompt == "a large purple triangle in the center"


def test_sizes_other_than_the_native_one(tmp_path, capsys):
    code, err = run(["generate", "--prompt", "a large purple triangle in the center", "--size", "32x32",
                     "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "--size 32x32: this model draws at 64x64 only" in err and files(tmp_path) == []
    code, err = run(["generate", *TINY, "--prompt", "a red cat", "--size", "48x48", "--out",
                     str(tmp_path / "t.png")], capsys)
    assert code == 0 and "warning: this model's native size is 32x32; at 48x48" in err


def test_huge_images_need_yes(tmp_path, capsys):
    code, err = run(["generate", *TINY, "--prompt", "a red cat", "--size", "16384x16384",
                     "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "16384x16384 is 268.4 megapixels per image" in err and "Add --yes" in err
    assert files(tmp_path) == []
    with pytest.raises(ValueError, match="100 images x 300 steps"):
        guards.check_job_size(100, 300, 64, 64, yes=False)
    guards.check_job_size(100, 300, 64, 64, yes=True)


def test_long_prompts_warn_with_the_words_dropped(tmp_path, capsys):
    long = "a red cat with a blue dog and a green star on the red cat with a blue dog and a green star"
    code, err = run(["generate", *TINY, "--prompt", long, "--out", str(tmp_path / "o.png")], capsys)
    assert code == 0 and "warning: the prompt is 23 tokens, the model reads 14; dropped: " in err
    assert "dropped: 'cat with a blue dog and a green star'" in err, err


def test_factor_parser():
    assert guards.factor("--reweight", "red=2") == ("red", 2.0)
    for bad in ("red", "=2", "red=inf"):
        with pytest.raises(ValueError, match="--reweight"):
            guards.factor("--reweight", bad)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "attnmod.cli", *args]


@pytest.mark.skipif(os.name != "posix", reason="ulimit")
def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path):
    out = tmp_path / "o.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # the embedded model: loading it writes nothing (the tiny models build a tokenizer in a temp folder)
    cmd = " ".join(f"'{a}'" for a in _cli("generate", "--steps", "2", "--prompt", "a large red circle on the left",
                                          "--out", str(out)))
    proc = subprocess.run(["bash", "-c", f"ulimit -f 1 && exec {cmd}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert f"cannot write {tmp_path}" in proc.stderr and "disk full or file-size limit" in proc.stderr
    assert files(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0 or not shutil.which("capsh"),
                    reason="needs root and capsh to drop the capability that overrides permissions")
def test_a_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = " ".join(f"'{a}'" for a in _cli("generate", *TINY, "--prompt", "a red cat", "--out",
                                          str(locked / "o.png")))
    proc = subprocess.run(["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", f"exec {cmd}"],
                          capture_output=True, text=True, env=env, timeout=300)
    locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert f"--out {locked / 'o.png'}: cannot write in {locked} (Permission denied)" in proc.stderr
    assert files(locked) == []


def test_toy_commands_check_their_output_first(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("keep me")
    (tmp_path / "folder").mkdir()
    for args, says in ((["eval-toy", "--n", "1", "--out", str(tmp_path / "folder")], "is a folder"),
                       (["eval-toy", "--n", "1", "--out", str(tmp_path / "file.txt" / "r.json")], "is a file"),
                       (["eval-toy", "--n", "1", "--out", str(tmp_path / "r.txt")], "writes .json files"),
                       (["eval-toy", "--n", "0"], "argument --n: expected a whole number >= 1"),
                       (["train-toy", "--workdir", str(tmp_path / "file.txt")], "--workdir")):
        code, err = run(args, capsys)
        assert code == 2 and says in err, (args, err)
    assert files(tmp_path) == ["file.txt", "folder"]


def test_recipes_name_their_model_portably_and_replay_from_a_copy(sd_folder, tmp_path, monkeypatch, capsys):
    from attnmod.loading import model_fingerprint
    from attnmod.recipe import Recipe

    shutil.copytree(sd_folder, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    code, _ = run(["generate", "--model", "copy", "--prompt", "a red cat", "--steps", "2", "--out", "a.png"], capsys)
    recipe = Recipe.from_png(tmp_path / "a.png")
    assert code == 0 and recipe.model == str((tmp_path / "copy").resolve())  # not "copy" as typed
    assert recipe.model_id == model_fingerprint(str(sd_folder)) != "" and len(recipe.model_id) == 12
    assert (recipe.device, recipe.dtype) == ("cpu", "float32")
    assert f"Model hash: {recipe.model_id}" in __import__("PIL.Image").Image.open("a.png").text["parameters"]
    monkeypatch.chdir(tmp_path / "copy")  # another working folder: the recipe still finds its model
    assert run(["generate", "--recipe", "../a.png", "--out", "../b.png"], capsys)[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    (tmp_path / "copy").rename(tmp_path / "moved")
    code, err = run(["generate", "--recipe", str(tmp_path / "a.png"), "--out", str(tmp_path / "c.png")], capsys)
    assert code == 2 and f"the recipe needs the model {tmp_path / 'copy'} (model id {recipe.model_id})" in err
    assert "give --model PATH" in err and not (tmp_path / "c.png").exists()
    code, err = run(["generate", "--recipe", str(tmp_path / "a.png"), "--model", str(tmp_path / "moved"),
                     "--out", str(tmp_path / "c.png")], capsys)
    import numpy as np
    from PIL import Image

    assert code == 0 and err == ""
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "c.png")))
    from attnmod.tiny import tiny_sd15

    tiny_sd15(seed=1).save_pretrained(tmp_path / "other", safe_serialization=True)
    code, err = run(["generate", "--recipe", str(tmp_path / "a.png"), "--model", str(tmp_path / "other"),
                     "--out", str(tmp_path / "d.png")], capsys)
    assert code == 0 and f"warning: the recipe was made with model id {recipe.model_id}" in err


def test_replaying_on_another_dtype_warns(sd_folder, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert run(["generate", "--model", str(sd_folder), "--prompt", "a red cat", "--steps", "2", "--out", str(out)],
               capsys)[0] == 0
    code, err = run(["generate", "--recipe", str(out), "--dtype", "bf16", "--out", str(tmp_path / "b.png")], capsys)
    assert code == 0 and "warning: the recipe was rendered on cpu (float32), this run uses cpu (bfloat16)" in err
