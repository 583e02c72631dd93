"""One output-directory rule (issue 17, Deliver 3): train refuses another run's results unless train.resume=auto
continues it or --overwrite deletes it; converters refuse non-empty OUT unless --overwrite; files get the umask."""
import os
import stat

from moedist.cli import main
from tests.test_hf_import import make_hf

TINY = "configs/tiny.yaml"
SMALL = ["train.max_steps=1", "train.warmup_steps=1", "train.eval_batches=1", "train.plot=false",
         "train.micro_batch_size=2", "data.seq_len=32", "model.max_seq_len=32"]


def test_train_into_another_run_refuses_then_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", TINY, *SMALL, f"train.output_dir={out}", "train.save_every=1"]) == 0
    before = {p.name for p in out.iterdir()}
    capsys.readouterr()
    assert main(["train", TINY, *SMALL, f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run's results" in err[0] and "--overwrite" in err[0]
    assert {p.name for p in out.iterdir()} == before
    (out / "stale.txt").write_text("x")
    assert main(["train", TINY, *SMALL, f"train.output_dir={out}", "train.resume=auto"]) == 0   # continues it
    assert main(["train", TINY, *SMALL, f"train.output_dir={out}", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "final" / "manifest.json").exists()


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["train", TINY, *SMALL, f"train.output_dir={out}"]) == 0
        make_hf("llama", vocab=256).save_pretrained(tmp_path / "hf")
        assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "md"), "lora.mode=full",
                     "lora.rank=2"]) == 0
        assert main(["convert", "to-hf", str(tmp_path / "md"), str(tmp_path / "back")]) == 0
        assert main(["convert", "peft", str(tmp_path / "md"), str(tmp_path / "peft")]) == 0
        for f in (out / "config.yaml", tmp_path / "back" / "config.json", tmp_path / "peft" / "adapter_config.json",
                  tmp_path / "back" / "model.safetensors", out / "final" / "model-dense.safetensors",
                  tmp_path / "md" / "model-dense.safetensors"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    finally:
        os.umask(old)


def test_converters_refuse_non_empty_out_unless_overwrite(tmp_path, capsys):
    make_hf("llama", vocab=256).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    runs = [["convert", "from-hf", str(tmp_path / "hf"), str(out)],
            ["convert", "to-hf", str(tmp_path / "hf"), str(out)],
            ["convert", "upcycle", str(tmp_path / "hf"), str(out), "--method", "sparse", "--num-experts", "2",
             "--top-k", "1"]]
    for argv in runs:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not an empty directory" in err[0] and "--overwrite" in err[0]
        assert (out / "keep.txt").exists()
    assert main(runs[0] + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert main(["convert", "to-hf", str(out), str(out)]) == 2   # OUT is SRC: never cleared
    assert (out / "manifest.json").exists()
