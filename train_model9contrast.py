"""Train variant model9contrast (see readaloud/variants.py) on one fold: python train_model9contrast.py --fold 0 --n_folds 6"""
from readaloud.pipeline.fold_run import train_variant_main

if __name__ == "__main__":
    train_variant_main("model9contrast")
