"""
CMA-ES in torch, written from N. Hansen, "The CMA Evolution Strategy: A Tutorial" (arXiv 1604.00772,
2016; equation numbers below are the tutorial's, Appendix A), for CraFT's search of its prompt
vector z (population 40, box [-5, 5]). Minimisation; the state is float64 on the CPU.

The tutorial's default strategy (its Table 1): weighted recombination with log weights and
mu = lambda // 2, cumulative step-size adaptation (CSA) with the h_sigma stall of the rank-one
update, rank-one and rank-mu covariance updates. Not active CMA (the tutorial's negative weights
for the lambda - mu worst, which pycma uses by default): without it we already need at most 1.4x
pycma's evaluations on the 10-d tests (test_cmaes.py). The eigendecomposition of C is lazy (every
~1 / (10 n (c_1 + c_mu)) generations).
separable=True is sep-CMA-ES (Ros & Hansen, PPSN 2008): C is diagonal and c_1, c_mu are multiplied
by (n + 2) / 3, O(n) per sample, for high dimensions.

Bounds (our choice; pycma's default BoundTransform is a different, smooth map): the distribution
lives unbounded, and a candidate x (the genotype) is evaluated at fold(x), the reflection of x at
the bounds (a continuous, piecewise-linear map with period 2 (hi - lo), the identity inside the
box). Every update uses the genotypes; ask(), sample(), mean and best_x are phenotypes (in the box).

    es = CMAES(x0, 0.5, popsize=40, bounds=(-5, 5))
    while es.generation < 100:
        X = es.ask()                                 # [lam, n], in the box
        es.tell(torch.stack([f(x) for x in X]))
"""
import math

import torch

_STATE = ("m", "sigma", "C", "B", "D", "p_c", "p_sigma", "generation", "evaluations", "eigen_generation",
          "best_x", "best_f", "_y")


class CMAES:
    """Minimises with ask() / tell() (module docstring); x0 [n], sigma0 the initial step size."""

    def __init__(self, x0, sigma0, popsize=None, bounds=None, separable=False, seed=0):
        x0 = torch.as_tensor(x0, dtype=torch.float64).detach().cpu().flatten()
        n = self.n = x0.numel()
        lam = self.lam = popsize or 4 + int(3 * math.log(n))
        if lam < 2 or sigma0 <= 0:
            raise ValueError(f"CMAES needs popsize >= 2 and sigma0 > 0 (got {lam}, {sigma0})")
        self.separable, self.seed = separable, seed
        self.bounds = None
        if bounds is not None:
            lo, hi = (torch.as_tensor(b, dtype=torch.float64).expand(n).clone() for b in bounds)
            if not bool((lo < hi).all()):
                raise ValueError("CMAES bounds need lo < hi in every coordinate")
            self.bounds = (lo, hi)
        # Strategy parameters, Table 1 (alpha_cov = 2)
        mu = self.mu = lam // 2
        w = math.log((lam + 1) / 2) - torch.log(torch.arange(1, mu + 1, dtype=torch.float64))   # eq. (49) w'_i
        self.w = w / w.sum()                                                              # eq. (53), i <= mu
        self.mu_eff = 1 / (self.w ** 2).sum().item()
        self.c_c = (4 + self.mu_eff / n) / (n + 4 + 2 * self.mu_eff / n)                  # eq. (56)
        self.c_sigma = (self.mu_eff + 2) / (n + self.mu_eff + 5)                           # eq. (55)
        self.d_sigma = 1 + 2 * max(0.0, math.sqrt((self.mu_eff - 1) / (n + 1)) - 1) + self.c_sigma
        self.c_1 = 2 / ((n + 1.3) ** 2 + self.mu_eff)                                      # eq. (57)
        self.c_mu = min(1 - self.c_1, 2 * (0.25 + self.mu_eff + 1 / self.mu_eff - 2)       # eq. (58)
                        / ((n + 2) ** 2 + self.mu_eff))
        if separable:                                   # Ros & Hansen: a diagonal C learns (n + 2) / 3 faster
            self.c_1 *= (n + 2) / 3
            self.c_mu = min(1 - self.c_1, self.c_mu * (n + 2) / 3)
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))                   # E||N(0, I)||
        self.eigen_every = max(1, math.ceil(1 / (10 * n * (self.c_1 + self.c_mu))))
        # Dynamic state
        self.m, self.sigma = x0.clone(), float(sigma0)
        self.p_c, self.p_sigma = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.C = torch.ones(n, dtype=torch.float64) if separable else torch.eye(n, dtype=torch.float64)
        self.B = None if separable else torch.eye(n, dtype=torch.float64)                 # C = B D^2 B^T
        self.D = torch.ones(n, dtype=torch.float64)
        self.generation = self.evaluations = self.eigen_generation = 0
        self.best_x, self.best_f, self._y = None, math.inf, None
        self.gen = torch.Generator().manual_seed(seed)

    def fold(self, x):
        """The box point that genotype(s) x are evaluated at: reflection at the bounds."""
        if self.bounds is None:
            return x
        lo, hi = self.bounds
        t = torch.remainder(x - lo, 2 * (hi - lo))                  # in [0, 2 (hi - lo))
        return (lo + (hi - lo) - (t - (hi - lo)).abs()).clamp(lo, hi)  # clamp: rounding only

    @property
    def mean(self):
        return self.fold(self.m)

    def _draw(self, k):
        """k genotypes y ~ N(0, C) (unscaled steps), eq. (38)-(39)."""
        z = torch.randn(k, self.n, dtype=torch.float64, generator=self.gen)                 # [k, n]
        return z * self.D if self.separable else (z * self.D) @ self.B.T                    # y = B D z, [k, n]

    def _invsqrt_C(self, y):
        """C^{-1/2} y for rows y [k, n]."""
        return y / self.D if self.separable else ((y @ self.B) / self.D) @ self.B.T

    def ask(self):
        """The next population, [popsize, n] float64 in the box; tell() takes their fitness."""
        self._y = self._draw(self.lam)
        return self.fold(self.m + self.sigma * self._y)                                    # eq. (40)

    def sample(self, k):
        """k fresh draws from the current distribution, [k, n] in the box (does not change tell())."""
        state = self.gen.get_state()
        x = self.fold(self.m + self.sigma * self._draw(k))
        self.gen.set_state(state)
        return x

    def tell(self, fitness):
        if self._y is None:
            raise ValueError("CMAES.tell() needs a population from ask() first")
        f = torch.as_tensor(fitness, dtype=torch.float64).detach().cpu().flatten()
        if f.numel() != self.lam:
            raise ValueError(f"CMAES.tell() got {f.numel()} fitness values for a population of {self.lam}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError("CMAES.tell() got a non-finite fitness value (nan or inf)")
        n, w, order = self.n, self.w, torch.argsort(f, stable=True)
        y, self._y = self._y[order], None                                                 # y_{i:lam}, [lam, n]
        if f[order[0]] < self.best_f:
            self.best_f, self.best_x = float(f[order[0]]), self.fold(self.m + self.sigma * y[0])
        self.generation += 1
        self.evaluations += self.lam
        # Selection and recombination, eq. (41)-(42), c_m = 1
        y_w = w @ y[:self.mu]                                                             # <y>_w, [n]
        self.m = self.m + self.sigma * y_w
        # Step-size control (CSA), eq. (43)-(44)
        c_sigma = self.c_sigma
        self.p_sigma = ((1 - c_sigma) * self.p_sigma                                      # eq. (43)
                        + math.sqrt(c_sigma * (2 - c_sigma) * self.mu_eff) * self._invsqrt_C(y_w[None])[0])
        norm_p = self.p_sigma.norm().item()
        self.sigma *= math.exp(self.c_sigma / self.d_sigma * (norm_p / self.chi_n - 1))  # eq. (44)
        # Covariance matrix adaptation, eq. (45)-(47)
        h_sigma = (norm_p / math.sqrt(1 - (1 - self.c_sigma) ** (2 * self.generation))
                   < (1.4 + 2 / (n + 1)) * self.chi_n)                          # 0 while ||p_sigma|| is long
        self.p_c = ((1 - self.c_c) * self.p_c                                             # eq. (45)
                    + h_sigma * math.sqrt(self.c_c * (2 - self.c_c) * self.mu_eff) * y_w)
        delta_h = (1 - h_sigma) * self.c_c * (2 - self.c_c)                               # delta(h_sigma)
        decay = 1 + self.c_1 * delta_h - self.c_1 - self.c_mu                             # sum(w) = 1, w_i° = w_i
        y = y[:self.mu]                                                                   # [mu, n]
        if self.separable:                                                                # eq. (47), diag(C) only
            self.C = decay * self.C + self.c_1 * self.p_c ** 2 + self.c_mu * (w @ y ** 2)
        else:                                                                             # eq. (47)
            self.C = (decay * self.C + self.c_1 * torch.outer(self.p_c, self.p_c)
                      + self.c_mu * (y.T * w) @ y)                                        # sum w_i y y^T, [n, n]
        self._decompose()

    def _decompose(self):
        """B, D from C (C = B D^2 B^T): each generation if separable, else every eigen_every generations."""
        if self.separable:
            self.C = self.C.clamp_min(1e-300)
            self.D = self.C.sqrt()
        elif self.generation - self.eigen_generation >= self.eigen_every:
            self.eigen_generation = self.generation
            self.C = (self.C + self.C.T) / 2                                              # enforce symmetry
            D2, self.B = torch.linalg.eigh(self.C)
            self.D = D2.clamp_min(1e-300).sqrt()

    def state_dict(self):
        """Everything the run depends on (tensors and python numbers; torch.load(weights_only=True) reads it)."""
        d = {k: getattr(self, k) for k in _STATE}
        d.update(n=self.n, popsize=self.lam, separable=self.separable, rng=self.gen.get_state(),
                 bounds=None if self.bounds is None else torch.stack(self.bounds))
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in d.items()}

    def load_state_dict(self, d):
        """Continue the run of `d` (saved by state_dict of a CMAES built with the same n, popsize,
        bounds and separable): the continuation is bit-identical to the uninterrupted run."""
        bounds = None if self.bounds is None else torch.stack(self.bounds)
        same_bounds = (d["bounds"] is None) == (bounds is None) and (bounds is None
                                                                     or torch.equal(d["bounds"], bounds))
        if (d["n"], d["popsize"], d["separable"]) != (self.n, self.lam, self.separable) or not same_bounds:
            raise ValueError(f"CMAES state for n={d['n']}, popsize={d['popsize']}, separable={d['separable']} "
                             f"and its bounds cannot be loaded into n={self.n}, popsize={self.lam}, "
                             f"separable={self.separable} and these bounds")
        for k in _STATE:
            v = d[k]
            setattr(self, k, v.clone() if torch.is_tensor(v) else v)
        self.gen.set_state(d["rng"])
