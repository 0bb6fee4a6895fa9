"""Evaluation protocols of a pre-trained encoder (SPEC section 8), one module each; `clmae-eval`
(clmae/evaluate.py) is their command line.

- features: the frozen encoder's CLS and mean-pooled patch features over a .beton, computed once and cached
- linprobe: the MAE linear-probe recipe on those features (also the classifier of fewshot)
- fewshot:  linear probes on 1, 2, 4, 8, 16 labelled images per class, 3 seeds
- knn:      the reference's L2 majority vote and the usual weighted cosine k-NN
- finetune: the MAE fine-tuning recipe on a DeepSpeed engine
"""
