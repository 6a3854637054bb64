"""Training with Lightning.

    steps.py        when things happen: which batches end an optimizer step, which steps log
    optim.py        AdamW or Muon + AdamW by parameter role; cosine or warmup-stable-decay schedules
    loggers.py      the default TensorBoard logger: runs compare in its HParams tab
    hardware.py     GPU peak FLOP/s (for MFU), memory and time-to-train estimates
    checkpoints.py  finding the last checkpoint, checking and reading one (a file or a folder of shards)
    strategies.py   parallelize (FSDP2 sharding, activation checkpointing), materialize (a model
                    built on the meta device gets its shards), and the FSDP strategy
    callbacks.py    text samples, preemption, throughput, the progress bar, the NaN/inf guard, RNG
                    states on resume
    experts.py      ExpertLoad: a mixture of experts' load and router losses logged, idle experts warned of
    debug.py        debugging aids behind a flag: HostSyncCheck, CompiledStepCheck, the resume
                    probes RecordBatches and SignalAt, peak_cpu_bytes, PeakHostMemory
    downstream.py   DownstreamEval: benchmark accuracies every N steps (HellaSwag, ARC, ...)
    module.py       LanguageModel: ties model, loss, optimizer and schedule to Lightning
    defaults.yaml   the settings every train.py run starts from; presets hold only what differs
"""
