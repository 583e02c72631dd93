"""Training: the loop (`trainer`), DeepSpeed set-up (`deepspeed_setup`, the only module
with DeepSpeed internals), data, metrics, progress, plots, LR schedule and the demo.

    moedist train CONFIG [key=value ...]     -> moedist.train.run:main_train
    moedist demo                             -> moedist.train.demo:main
"""
