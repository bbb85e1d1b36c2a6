set -e
mkdir -p /tmp/old && cp -r src /tmp/old/ && cp .gpudata/old_extract.py /tmp/old/src/histomil/features/extract.py
for i in 1 2 3; do
  for v in old new; do
    if [ $v = old ]; then P=/tmp/old/src; else P=$PWD/src; fi
    PYTHONPATH=/tmp/site:$P HF_HUB_OFFLINE=1 python3 benchmarks/gpu.py --device cuda --data .gpudata/ebhi --tiles 640 \
      --encoders efficientnet_lite0 --models gated_abmil --mil-bags 4 --repeats 5 --out $OUT/$v$i | grep -E "^efficientnet" | sed "s/^/$v $i: /"
  done
done
