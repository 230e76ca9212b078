"""Attention output error when the query is quantized per key block (issue 22's fast path).

int4 keys as the cache stores them (per-channel scale and zero over blocks of 16 tokens), half
of the 16 cases with three outlier channels; the query folded with each block's channel scales
and rounded to LEVELS steps each side of zero (127: int8, 32767: int16); the worst error of the
attention output against the exact scores on the same reconstruction, relative to the output's
largest element. Needs numpy (llama-cpp-python brings it):

    PYTHONPATH=$(scripts/llama-cpp-server) python3 docs/query-quantization-simulation.py 127
    PYTHONPATH=$(scripts/llama-cpp-server) python3 docs/query-quantization-simulation.py 32767
"""
import numpy as np
import sys
LEVELS=float(sys.argv[1])
rng=np.random.default_rng(1)
d,bs,T=64,16,1024
worst=[]
for trial in range(16):
    outl = trial%2==1
    K=rng.normal(size=(T,d)).astype(np.float32)
    if outl: K[:, [3,17,40]] *= 8
    K += rng.normal(size=d)*2  # channel means
    V=rng.normal(size=(T,d)).astype(np.float32)
    q=rng.normal(size=d).astype(np.float32)*(1.5 if trial<8 else 3.0)
    scale=1/8
    # int4 per channel per block keys
    Kr=np.empty_like(K)
    S=np.empty((T//bs,d)); Z=np.empty((T//bs,d)); X=np.empty((T,d))
    for b in range(T//bs):
        blk=K[b*bs:(b+1)*bs]; mn=blk.min(0); mx=blk.max(0); s=(mx-mn)/15; s[s==0]=1
        x=np.clip(np.round((blk-mn)/s),0,15); X[b*bs:(b+1)*bs]=x; S[b]=s; Z[b]=mn
        Kr[b*bs:(b+1)*bs]=x*s+mn
    exact_scores=(Kr@q)*scale
    # fast: folded query per block quantized to int8 symmetric
    fast_scores=np.empty(T)
    for b in range(T//bs):
        f=q*S[b]; a=np.abs(f).max()/LEVELS; fq=np.round(f/a)
        fast_scores[b*bs:(b+1)*bs]=(X[b*bs:(b+1)*bs]@fq*a + q@Z[b])*scale
    def attn(s):
        w=np.exp(s-s.max()); w/=w.sum(); return w@V
    o1=attn(exact_scores.astype(np.float64)); o2=attn(fast_scores)
    err=np.abs(o1-o2).max()/np.abs(o1).max()
    worst.append(err)
print(["%.1e"%e for e in worst]); print("max",max(worst))
