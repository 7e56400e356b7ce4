# lamra-pl: one target per stage. Every variable is overridable, e.g.
#   make stage2 CONFIG=experiments/lamra_ret/stage2_instruct.yaml BACKBONE=checkpoints/stage1-merged ARGS="--trainer.devices=4"
# Set-up on a fresh machine is `make demo` or `make test`: both create the environment in .venv/ if missing.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
LAMRA := $(BIN)/lamra-pl
FAISS ?= cpu# cpu | gpu: which faiss wheel to install (they conflict)
STAMP := $(VENV)/.installed-$(FAISS)

ARGS ?=
RUNS ?= runs
BACKBONE ?=
TINY_BACKBONE ?= checkpoints/tiny-qwen2vl
DATA ?=# a folder written by convert-mbeir / convert-nli: stage 1 reads DATA/train/*_task1, stage 2 DATA/train
MBEIR ?=# an M-BEIR folder, for make convert-mbeir
NLI_CSV ?=# a SimCSE NLI csv (sent0,sent1,hard_neg), for make convert-nli
CKPT ?= $(RUNS)/lamra_ret_stage1/version_0/checkpoints/last.ckpt
OUT ?= checkpoints/lamra_ret_stage1_merged
PYTEST_ARGS ?=
TEST_WORKERS ?= 2# pytest-xdist workers for make test (0: one process)
MODEL ?=# a trained retriever (a `fit` checkpoint or a merged folder), for index, retrieve, search
SPLIT ?= test
INDEX ?= indexes/$(SPLIT)_global# the index of DATA/eval/SPLIT/global_pool
EVAL ?= $(RUNS)/eval_$(SPLIT)# run files and results of `make retrieve` / `make evaluate`
POOL ?= local# make evaluate: local or global
TRAIN_INDEX ?= indexes/train_pool# MODEL's index of DATA/train_pool, for make rerank-data
TRAIN_RUNS ?= $(RUNS)/train_retrieval# MODEL's top 100 of the training queries, for make rerank-data
RERANK_DATA ?= $(if $(DATA),$(DATA)/rerank,data/rerank)# reranker training shards
RERANKER ?= $(RUNS)/lamra_rank/version_0/checkpoints/last.ckpt# a trained reranker, for make rerank
JUDGE ?=# an off-the-shelf instruct model's checkpoint folder (e.g. a Qwen2-VL-7B-Instruct download), for make rerank-zeroshot
FUSION ?= experiments/lamra_rank/fusion.yaml# w of final = retrieval + w * rerank: a number or a weights file
GRID ?= demo# a grid file experiments/ablations/grids/GRID.yaml, for make ablations
RUNS_DIR ?= $(RUNS)/ablations/demo# runs to compare, for make report (GRID=demo and demo_rerank; demo_bias: demo_global)
MINE_RUNS ?= $(RUNS)/train_mining# MODEL's top 50 of the training queries in the union training pool, for make mine
MINED ?= $(if $(DATA),$(DATA)/mined,data/mined)# hard-negative training shards (make mine)
STRATEGY ?= modality# make mine: modality (MM-Embed), topk (UniIR, modality-blind) or random
TEXT_DATA ?=# text-to-text retrieval shards (e.g. from make convert-nli) for make stage-continual
MINED_RATIO ?= 1# make stage-continual: the mix of MINED and TEXT_DATA (ratios, normalised)
TEXT_RATIO ?= 1
MODELS ?=# make merge-models: the fits to merge, a list: '[runs/a/checkpoints/last.ckpt, runs/b/checkpoints/last.ckpt]'
MERGED ?= checkpoints/merged_models# make merge-models: the output model folder (new or empty)
SETS ?= flickr30k coco sharegpt4v urban1k circo genecis visdial vist multiturn_fashioniq ccneg sugarcrepe# make zeroshot: LamRA's zero-shot sets to evaluate
ZEROSHOT_RAW ?= data/zeroshot_raw# ZEROSHOT_RAW/<set>: each set as its authors distribute it (README: Zero-shot sets)
ZEROSHOT_DATA ?= data/zeroshot# converted sets: ZEROSHOT_DATA/<set>
ZEROSHOT_RUNS ?= $(RUNS)/zeroshot# run files and results: ZEROSHOT_RUNS/<set>/local; the table: ZEROSHOT_RUNS/zeroshot.md
DISTILL_RUNS ?= $(RUNS)/train_distill# MODEL's top DISTILL_K of the training queries, RERANKER's scores of them
DISTILL_K ?= 16# candidates per query's list (make distill-data)
DISTILLED ?= $(if $(DATA),$(DATA)/distilled,data/distilled)# distillation training shards (make distill-data)

backbone_arg = $(if $(BACKBONE),--model.init_args.backbone.path=$(BACKBONE))
# a grid's variables from NAME=VALUE words (those with an empty value are left to the grid's defaults)
vars = $(foreach pair,$(1),$(if $(word 2,$(subst =, ,$(pair))),--variables+=$(pair)))
# quoted: the glob is expanded by lamra-pl, not the shell
stage1_data = $(if $(DATA),'--data.init_args.train_shards=$(DATA)/train/*_task1')
stage2_data = $(if $(DATA),'--data.init_args.train_shards=$(DATA)/train')
comma := ,
empty :=
space := $(empty) $(empty)
continual_data = $(if $(TEXT_DATA),'--data.init_args.sources={"$(MINED)": $(MINED_RATIO)$(comma) "$(TEXT_DATA)": $(TEXT_RATIO)}')

.PHONY: merge-models zeroshot distill-data distill ablations report mine stage-hardneg stage-continual rerank-zeroshot bench-train reliability venv tiny-backbone stage1 stage2 merge convert-mbeir convert-nli emoji index retrieve evaluate eval search \
	rerank-data rerank-train rerank tune-fusion test lint demo tensorboard clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(FAISS),dev,demo,gguf,video]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import lamra_pl, torch, torchvision, lightning, transformers, peft, webdataset, faiss"
	rm -f $(VENV)/.installed-*
	touch $@

tiny-backbone: venv
	$(LAMRA) tiny-backbone --out $(TINY_BACKBONE) $(ARGS)

stage1: CONFIG ?= experiments/lamra_ret/stage1_text.yaml
stage1: venv
	$(LAMRA) fit -c $(CONFIG) $(backbone_arg) $(stage1_data) $(ARGS)

stage2: CONFIG ?= experiments/lamra_ret/stage2_instruct.yaml
stage2: venv
	$(LAMRA) fit -c $(CONFIG) $(backbone_arg) $(stage2_data) $(ARGS)

merge: venv
	$(LAMRA) merge --ckpt $(CKPT) --out $(OUT)

merge-models: venv  # the average of MODELS (checkpoints or model folders) into MERGED; ARGS="--weights=[0.3,0.7]", "--method=task_arithmetic"
	$(LAMRA) merge-models --models '$(MODELS)' --out $(MERGED) $(ARGS)

convert-mbeir: venv
	$(LAMRA) convert-mbeir --root $(MBEIR) --out $(DATA) $(ARGS)

convert-nli: venv
	$(LAMRA) convert-nli --csv $(NLI_CSV) --out $(DATA) $(ARGS)

index: venv  # encode DATA/eval/SPLIT/global_pool with MODEL into INDEX (run again to resume)
	$(LAMRA) index --model $(MODEL) --pool $(DATA)/eval/$(SPLIT)/global_pool --out $(INDEX) $(ARGS)

retrieve: venv  # every task's queries against its local pool and the global pool: run files in EVAL/{local,global}
	$(LAMRA) retrieve --model $(MODEL) --index $(INDEX) --queries '$(DATA)/eval/$(SPLIT)/*_task*' --out $(EVAL) $(ARGS)

evaluate: venv  # Recall@K per task and averaged: EVAL/POOL/results.{json,md} (POOL=global for the global pool)
	$(LAMRA) evaluate --runs $(EVAL)/$(POOL)

eval: venv  # the whole M-BEIR evaluation of MODEL on DATA's SPLIT: index, retrieve, evaluate local and global
	$(LAMRA) grid --grid experiments/pipelines/eval.yaml $(call vars,model=$(MODEL) data=$(DATA) split=$(SPLIT) \
		index=$(INDEX) runs=$(EVAL)) '--variables+=args=$(ARGS)'

search: venv  # e.g. make search MODEL=... ARGS='--text "a red apple" --k 5'
	$(LAMRA) search --model $(MODEL) --index $(INDEX) $(ARGS)

rerank-data: venv  # MODEL's top 100 of the training queries (each task's training pool) -> RERANK_DATA shards
	$(LAMRA) grid --grid experiments/pipelines/rerank_data.yaml $(call vars,model=$(MODEL) data=$(DATA) \
		index=$(TRAIN_INDEX) runs=$(TRAIN_RUNS) shards=$(RERANK_DATA)) '--variables+=args=$(ARGS)'

rerank-train: CONFIG ?= experiments/lamra_rank/rerank_joint.yaml
rerank-train: venv  # LamRA-Rank, joint pointwise + listwise, on RERANK_DATA
	$(LAMRA) fit -c $(CONFIG) $(backbone_arg) --data.init_args.train_shards=$(RERANK_DATA) $(ARGS)

rerank: venv  # rerank EVAL/local (from make retrieve) with RERANKER, fuse with FUSION, evaluate: EVAL/reranked_local
	$(LAMRA) grid --grid experiments/pipelines/rerank.yaml $(call vars,model=$(RERANKER) runs=$(EVAL)/local \
		out=$(EVAL)/reranked_local) '--variables+=args=--fusion=$(FUSION) $(ARGS)'

rerank-zeroshot: venv  # MM-Embed: an off-the-shelf MLLM (JUDGE, a folder) re-sorts EVAL/local's top 10 by P(True)
	$(LAMRA) grid --grid experiments/pipelines/rerank.yaml $(call vars,model=$(JUDGE) runs=$(EVAL)/local \
		out=$(EVAL)/zeroshot_local) '--variables+=args=--zero_shot=true $(ARGS)'

tune-fusion: venv  # w per task on a validation split's reranked runs: make tune-fusion EVAL=runs/eval_val
	$(LAMRA) tune-fusion --reranked $(EVAL)/reranked_local --out $(EVAL)/fusion.yaml

mine: venv  # MODEL's top 50 of the training queries in the union training pool -> hard-negative shards in MINED
	$(LAMRA) grid --grid experiments/pipelines/mine.yaml $(call vars,model=$(MODEL) data=$(DATA) index=$(TRAIN_INDEX) \
		runs=$(MINE_RUNS) shards=$(MINED) strategy=$(STRATEGY)) '--variables+=args=$(ARGS)'

stage-hardneg: CONFIG ?= experiments/mm_embed/stage_hardneg.yaml
stage-hardneg: venv  # MM-Embed's M_hard: stage 2 again from the stage-1 model (BACKBONE) on MINED (make mine)
	$(LAMRA) fit -c $(CONFIG) $(backbone_arg) --data.init_args.train_shards=$(MINED) $(ARGS)

stage-continual: CONFIG ?= experiments/mm_embed/stage_continual.yaml
stage-continual: venv  # MM-Embed's continual fine-tuning of M_hard (BACKBONE, merged) on MINED + TEXT_DATA (both, or the config's sources)
	$(LAMRA) fit -c $(CONFIG) $(backbone_arg) $(continual_data) $(ARGS)

zeroshot: venv  # per set of SETS: convert (once), index, retrieve, evaluate (experiments/pipelines/zeroshot.yaml); one table
	set -e; for s in $(SETS); do case $$s in circo|visdial|vist|multiturn_fashioniq) split=val;; *) split=test;; esac; \
		$(LAMRA) grid --grid experiments/pipelines/zeroshot.yaml $(call vars,model=$(MODEL)) --variables+=set=$$s \
			--variables+=raw=$(ZEROSHOT_RAW)/$$s --variables+=split=$$split --variables+=data=$(ZEROSHOT_DATA)/$$s \
			--variables+=index=$(ZEROSHOT_RUNS)/$$s/index --variables+=runs=$(ZEROSHOT_RUNS)/$$s '--variables+=args=$(ARGS)'; \
	done
	$(LAMRA) zeroshot-report --runs $(ZEROSHOT_RUNS) --sets '[$(subst $(space),$(comma),$(strip $(SETS)))]'

distill-data: venv  # MODEL's top DISTILL_K of the training queries, scored by RERANKER -> DISTILLED shards
	$(LAMRA) grid --grid experiments/pipelines/distill_data.yaml $(call vars,model=$(MODEL) reranker=$(RERANKER) \
		data=$(DATA) index=$(TRAIN_INDEX) runs=$(DISTILL_RUNS) k=$(DISTILL_K) shards=$(DISTILLED)) '--variables+=args=$(ARGS)'

distill: CONFIG ?= experiments/lamra_ret/distill.yaml
distill: venv  # the retriever (BACKBONE, merged) trained on DISTILLED against the reranker's scores (U-MARVEL)
	$(LAMRA) fit -c $(CONFIG) $(backbone_arg) --data.init_args.train_shards=$(DISTILLED) $(ARGS)

ablations: venv  # run a grid (experiments/ablations/grids/GRID.yaml; done steps are skipped); its last step reports
	$(LAMRA) grid --grid experiments/ablations/grids/$(GRID).yaml $(ARGS)

report: venv  # runs' event files and configs -> RUNS_DIR/report.md, report.json, val_recall.png, final_average.png
	$(LAMRA) report --runs $(RUNS_DIR)

emoji: venv  # the embedded default data set in M-BEIR format (demo/mbeir), converted into DATA; the tiny backbone
	$(LAMRA) grid --grid experiments/demo/prepare.yaml --variables+=data=$(or $(DATA),demo/data)

lint: venv
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments

bench-train: venv  # retriever training step: throughput, memory, MFU (e.g. ARGS="--shape 2b --batch-sizes 32 64")
	$(BIN)/python experiments/benchmarks/train_step.py $(ARGS)

test: venv lint  # two pytest workers, one per core (a test file's tests stay on one worker: module fixtures once)
	OMP_NUM_THREADS=$(if $(filter 0 1,$(TEST_WORKERS)),2,1) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: venv  # the whole pipeline on CPU (a grid: run it again after a kill, done steps are skipped)
	$(LAMRA) grid --grid experiments/demo/demo.yaml $(ARGS)

reliability: venv  # the fault suite, then its findings into the README's Reliability table
	rm -f $(RUNS)/reliability.jsonl && mkdir -p $(RUNS)
	LAMRA_FAULT_REPORT=$(abspath $(RUNS))/reliability.jsonl $(BIN)/python -m pytest -q tests/faults
	$(BIN)/python tests/faults/reliability_table.py $(RUNS)/reliability.jsonl README.md

tensorboard: venv
	$(BIN)/tensorboard --logdir $(RUNS)

clean:
	rm -rf $(RUNS) demo checkpoints/tiny-* .pytest_cache
