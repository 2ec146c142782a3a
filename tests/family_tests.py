"""The tests every family gets (test_families_a.py and test_families_b.py each run them on half of the families, so
that the two test workers share them)."""

from __future__ import annotations

import pytest

import family_stages as stages
import families


def family_tests(names: list[str]):
    """The test functions and fixtures for these families, to be bound into a test module's namespace."""

    @pytest.fixture(scope="module")
    def built(tmp_path_factory):
        root = tmp_path_factory.mktemp("families")
        return {name: families.build(families.BY_NAME[name], root / name / "base") for name in names}

    @pytest.fixture(scope="module")
    def lora_runs(built, tmp_path_factory):
        return {"root": tmp_path_factory.mktemp("lora")}

    def lora(name, built, runs, capsys):
        if name not in runs:
            runs[name] = stages.train_lora(built[name], runs["root"] / name, capsys)
        return runs[name]

    @pytest.mark.parametrize("name", names)
    def test_lora_training_merges_into_a_verified_model(name, built, lora_runs, capsys):
        out, printed = lora(name, built, lora_runs, capsys)
        stages.check_lora(families.BY_NAME[name], built[name], out, printed)

    @pytest.mark.parametrize("name", names)
    def test_full_fine_tuning_saves_a_loadable_model(name, built, tmp_path):
        stages.check_full(families.BY_NAME[name], built[name], stages.train_full(built[name], tmp_path / "full"))

    @pytest.mark.parametrize("outtype", stages.GGUF_TYPES)
    @pytest.mark.parametrize("name", names)
    def test_the_merged_model_exports_to_a_verified_gguf(name, outtype, built, lora_runs, capsys, tmp_path):
        out, _ = lora(name, built, lora_runs, capsys)
        stages.check_gguf(families.BY_NAME[name], out / "merged_model", tmp_path, outtype)

    @pytest.mark.parametrize("name", names)
    def test_the_merged_model_replies_through_its_chat_template(name, built, lora_runs, capsys):
        out, _ = lora(name, built, lora_runs, capsys)
        stages.check_reply(families.BY_NAME[name], out / "merged_model")

    @pytest.mark.skipif(not stages.CONVERTER.is_dir(), reason="llama.cpp's converter is not unpacked (make setup)")
    @pytest.mark.parametrize("name", names)
    def test_the_gguf_equals_llama_cpp_converters_file(name, built, tmp_path):
        family = families.BY_NAME[name]
        ours = stages.check_gguf(family, built[name], tmp_path / "ours", "f32")
        differences = stages.compare_with_llama_cpp(family, built[name], tmp_path / "ours" / f"{name}-f32.gguf",
                                                    tmp_path)
        assert not differences, (differences, ours["tokenizer"])

    return {f.__name__: f for f in (built, lora_runs, test_lora_training_merges_into_a_verified_model,
                                    test_full_fine_tuning_saves_a_loadable_model,
                                    test_the_merged_model_exports_to_a_verified_gguf,
                                    test_the_merged_model_replies_through_its_chat_template,
                                    test_the_gguf_equals_llama_cpp_converters_file)}
