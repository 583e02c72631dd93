"""Training: the loop (`trainer`), runners behind one interface (`state.Runner`: `runners`,
`deepspeed_runner`), DeepSpeed set-up (`deepspeed_setup`; with `deepspeed_runner` the only
modules with DeepSpeed internals), data, metrics, progress, plots, LR schedule and the demo.

    moedist train CONFIG [key=value ...]     -> moedist.train.run:main_train
    moedist demo                             -> moedist.train.demo:main
"""
