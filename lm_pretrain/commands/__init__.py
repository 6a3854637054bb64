"""The console commands: one module each, its entry point and the code only it runs.

    parsing.py   the one flag style of every entry point (--help, --config): LightningCLI's
    train.py     lm-pretrain-train / python train.py: the LightningCLI (every argument a flag and a YAML key)
    prepare.py   lm-pretrain-prepare: raw text -> a prepared dataset (lm_pretrain.data.prepare)
    tokenizer.py lm-pretrain-tokenizer: a BPE of your own (lm_pretrain.data.train_tokenizer)
    generate.py  lm-pretrain-generate: sampling from a checkpoint
    export.py    lm-pretrain-export: a checkpoint -> a Hugging Face model folder
    evaluate.py  lm-pretrain-evaluate: benchmarks with EleutherAI's lm-evaluation-harness
    sizes.py     lm-pretrain-sizes: parameters and FLOPs of configs
    experiment.py lm_pretrain.experiment: a train.py run built in Python (notebooks), started by .fit()
"""
