"""Write the README's Reliability table from the fault suite's findings (`make reliability`).

    python tests/faults/reliability_table.py FINDINGS.jsonl README.md

Replaces what lies between the `<!-- reliability -->` and `<!-- /reliability -->` markers with a row per class of
fault (how many cases the suite asserted, by which tests) and, folded below it, every case. Each fault test belongs
to one class, named in CLASSES; a finding of a test that is in none is an error (classify it here).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

START, END = "<!-- reliability -->", "<!-- /reliability -->"

# Class of fault -> the tests (file::function, without parameters) that assert its cases. In the README's order.
CLASSES: dict[str, tuple[str, ...]] = {
    "code run because a file says so (checkpoints, settings files, model folders)": (
        "test_untrusted_files.py::test_a_checkpoint_naming_a_shell_running_class_runs_nothing",
        "test_untrusted_files.py::test_trust_remote_code_is_never_taken_from_a_checkpoint",
        "test_untrusted_files.py::test_trust_remote_code_is_never_taken_from_a_merged_folder",
        "test_untrusted_files.py::test_a_settings_file_naming_a_class_outside_the_project_is_refused",
        "test_untrusted_files.py::test_a_file_cannot_choose_an_attention_kernel",
    ),
    "paths from data leading out of their root or `--out`": (
        "test_convert.py::test_image_paths_leading_outside_the_root_are_never_read",
        "test_convert.py::test_names_from_the_data_cannot_write_outside_out",
        "test_artefacts.py::test_a_task_name_in_runs_json_cannot_write_or_delete_outside_out",
    ),
    "inputs mixed or changed under a resume; writers killed": (
        "test_artefacts.py::test_an_index_resumed_over_another_pool_is_refused_and_its_parts_are_kept",
        "test_artefacts.py::test_an_index_resumed_after_its_shards_changed",
        "test_shard_reading.py::test_resume_over_changed_shards_is_refused_naming_them",
        "test_shard_reading.py::test_a_shard_of_the_same_size_with_other_samples_is_refused_and_old_checkpoints_resume",
        "test_convert.py::test_a_killed_conversion_is_never_trained_on_and_a_rerun_completes_it",
        "test_convert.py::test_a_writer_killed_mid_shard_leaves_no_cut_shard_and_a_refused_folder",
        "test_convert.py::test_a_rerun_with_other_inputs_rewrites_its_own_folders_only",
        "test_convert.py::test_a_rerun_over_an_earlier_versions_output_rewrites_it",
    ),
    "samples lost, merged or doubled without a count": (
        "test_convert.py::test_duplicate_candidate_ids_keep_the_first_and_count_the_rest",
        "test_convert.py::test_duplicate_queries_keep_the_first",
        "test_convert.py::test_each_malformed_value_is_a_counted_skip_naming_its_line",
        "test_convert.py::test_a_line_that_is_not_utf8_costs_only_itself",
        "test_convert.py::test_a_deeply_nested_or_huge_number_line_is_a_counted_skip",
        "test_convert.py::test_bad_images_are_counted_skips_at_conversion",
        "test_convert.py::test_the_report_names_every_file_read_or_ignored_empty_tasks_and_balances",
        "test_shard_reading.py::test_a_repeated_key_keeps_the_first_sample_and_is_counted_and_named",
        "test_shard_reading.py::test_zeroed_and_empty_shards_are_counted_and_named",
        "test_shard_reading.py::test_a_fit_over_a_zeroed_shard_and_a_repeated_key_trains_on_the_rest_and_counts_both",
        "test_shard_reading.py::test_evaluation_reads_refuse_a_shard_that_would_lose_or_merge_samples",
        "test_artefacts.py::test_a_task_with_an_empty_pool_is_refused_before_the_model_is_loaded",
        "test_bad_input.py::test_training_survives_every_fault_and_accounts_for_every_sample",
    ),
    "artefacts used from another folder or machine": (
        "test_portable_checkpoints.py::test_a_checkpoint_moved_with_its_backbone_or_given_one_loads_anywhere",
        "test_artefacts.py::test_a_moved_run_folder_evaluates_from_another_directory_as_before",
        "test_artefacts.py::test_a_legacy_run_folder_moved_with_its_tree_evaluates_from_another_directory",
    ),
    "everyday mistakes (a bad path, key or value)": (
        "test_untrusted_files.py::test_a_bad_ckpt_path_is_one_line",
        "test_untrusted_files.py::test_a_bad_yaml_key_or_value_is_one_line_naming_the_file",
        "test_untrusted_files.py::test_a_bad_trainer_setting_is_one_line",
        "test_loading.py::test_a_checkpoint_of_another_config_says_what_differs",
    ),
    "kills and non-finite steps in training": (
        "test_resume.py::test_killed_mid_step_resumes_with_the_same_data_rng_and_optimizer",
        "test_resume.py::test_killed_while_writing_a_checkpoint_keeps_the_previous_one",
        "test_bad_input.py::test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_message",
    ),
}


def class_of(row: dict[str, str]) -> str:
    test = f"{row['file']}::{row['test'].split('[')[0]}"
    for name, tests in CLASSES.items():
        if test in tests:
            return name
    raise SystemExit(f"{test} is in no class of tests/faults/reliability_table.py CLASSES: add it there")


def table(findings: Path) -> str:
    rows = [json.loads(line) for line in findings.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{findings}: no findings (did the fault suite pass?)")
    by_class: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_class[class_of(row)].append(row)
    lines = ["| class of fault | cases asserted | tests |", "|---|---|---|"]
    for name in CLASSES:
        cases = by_class.get(name, [])
        tests = sorted({r["test"].split("[")[0] for r in cases})
        lines.append(f"| {name} | {len(cases)} | {len(tests)} |")
    lines.append(f"| **all** | **{len(rows)}** | **{len({r['test'].split('[')[0] for r in rows})}** |")
    lines += ["", f"<details><summary>Every case ({len(rows)})</summary>", ""]
    lines += ["| class | fault injected | what lamra-pl did (asserted) | test |", "|---|---|---|---|"]
    for name in CLASSES:
        for r in by_class.get(name, []):
            lines.append(f"| {name} | {r['fault']} | {r['outcome']} | `tests/faults/{r['file']}::{r['test']}` |")
    lines += ["", "</details>"]
    return "\n".join(lines)


def main() -> None:
    findings, readme = Path(sys.argv[1]), Path(sys.argv[2])
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table(findings)}\n{END}{tail}")


if __name__ == "__main__":
    main()
