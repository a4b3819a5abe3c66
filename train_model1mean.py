"""Train variant model1mean (see readaloud/variants.py) on one fold: python train_model1mean.py --fold 0 (the fold count is the fold file's)"""
from readaloud.pipeline.fold_run import train_variant_main

if __name__ == "__main__":
    train_variant_main("model1mean")
