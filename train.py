"""Pre-train a language model: `python train.py fit --config configs/tiny.yaml`.

`python train.py --help` lists the subcommands (fit, validate, test, predict);
`python train.py fit --help` lists every flag. See README.md.
"""

from lm_pretrain.commands.train import main

if __name__ == "__main__":
    main()
