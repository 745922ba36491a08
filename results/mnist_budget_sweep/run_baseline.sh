#!/bin/bash
# #26 confirmation: the report preset (mnist_dcgan) at the full budget (1.0M real images), seed $1, with the budget
# sweep's protocol (LeNet FID 10k vs train every 250k images, best kept); resumable (--resume auto)
cd /work/runs26
export GANCORE_DATA=/work/shared/data GANCORE_CACHE=/work/main/.cache/gancore MPLBACKEND=Agg PYTHONPATH=/work/runs26 OMP_NUM_THREADS=1
seed=${1:-1}
exec nice -n 5 taskset -c 0 /work/main/.venv/bin/python jobs/train.py --config configs/mnist_dcgan.yaml \
  --out runs/sweeps/mnist_budget/confirm/baseline_seed$seed --resume auto \
  train.max_images=1000000 train.checkpoint_every=500 train.log_every=100 train.snapshot_epochs=[1,8,16] \
  "train.loss_ranges=[[1,8],[9,17]]" track.image_every=1000 eval.every=0 eval.every_images=250000 \
  eval.n_samples=10000 eval.extractor=lenet_mnist eval.real_split=train eval.metrics=[fid] train.seed=$seed \
  train.progress=false
