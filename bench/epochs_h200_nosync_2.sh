. bench/h200_workdir.sh
python3 -m pytest -q -p no:cacheprovider tests/test_recipe.py -k never_wait 2>&1 | grep -E "^E|passed|failed" | head -20 | tee /tmp/bgout/pytest_cuda_nosync2.txt
E="python3 bench/epochs.py run --rows-dir /tmp/epochs --repeats-block 1"
O="--out /tmp/bgout/epochs_h200_nosync --append"
$E $O --jobs epoch_b4 --recipes --variant "pad256:pad_to_multiple_of=256"
$E $O --jobs epoch_b4 --recipes --variant "pad128_paged_adamw:pad_to_multiple_of=128,optimizer=paged_adamw_32bit"
$E $O --jobs epoch_b4 --recipes pipeline
