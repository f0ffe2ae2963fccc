# Call 4 (issue 12): launch shapes of the GEMVs into the residual under norm_in_gemv (residual_plans_ab.py).
source docs/gpu/runs-2026-12-04/common.sh
step plans_ab.txt 200 python docs/gpu/runs-2026-12-04e/residual_plans_ab.py
