//! The ONNX `LSTM` operator run as one whole-sequence op instead of tract's `Scan` loop.
//!
//! tract 0.23.9 lowers an ONNX `LSTM` to a `Scan` whose body (a matrix product and a fused
//! epilogue) is dispatched as graph nodes once per timestep; on the demo-lstm that cost 3.5× the
//! time onnxruntime takes for the same file (docs/BENCHMARKS.md, issue 13). Its GRU already gets a
//! whole-sequence op (`GruSeq`); the LSTM does not, because the generic fusion hook excludes a
//! cell state. This module gives the LSTM the same treatment from outside tract: the importer's
//! `LSTM` is replaced by an expansion that wires [`LstmSeq`] when the node is the plain forward
//! LSTM every recurrent model of the toolkit exports (constant weights, default activations, no
//! initial state other than zeros, peepholes or sequence lengths), and tract's own lowering otherwise. The model
//! contract is untouched: the file is standard ONNX, and the parity tests hold this op to PyTorch
//! and onnxruntime like every other.
//!
//! The op takes the input-side product of every step in one matrix product, then per step one
//! `[batch, hidden] × [hidden, 4·hidden]` product accumulated onto it and the cell's element-wise
//! update, with tract's vectorised sigmoid and tanh.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::ops::rec::common::CommonRec;
use tract_onnx::ops::rec::lstm::LSTM;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ndarray::linalg::general_mat_mul;
use tract_onnx::tract_core::ndarray::{Array2, Array3, ArrayView2, ArrayViewMut2, ShapeBuilder};
use tract_onnx::tract_core::tract_linalg::routines::Func;
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::expandable::{expand, Expansion};

/// Makes `onnx` import every `LSTM` node through [`Lstm`].
pub fn register(onnx: &mut tract_onnx::Onnx) {
    onnx.op_register.insert("LSTM", parse);
}

fn parse(
    _ctx: &ParsingContext,
    pb: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    // tract's own LSTM, kept for what the fused op does not cover.
    let stock = LSTM {
        f: Box::new(tract_onnx::tract_hir::ops::nn::sigmoid()),
        g: Box::new(tract_onnx::tract_hir::ops::math::tanh()),
        h: Box::new(tract_onnx::tract_hir::ops::math::tanh()),
    };
    let common = CommonRec::from_node_and_options(pb, 3, 0, Box::new(stock))?;
    let activations = pb.get_attr_opt_vec::<String>("activations")?;
    let plain = pb
        .get_attr_opt::<String>("direction")?
        .is_none_or(|d| d == "forward")
        && pb.get_attr_opt::<f32>("clip")?.is_none()
        && pb.get_attr_opt::<i64>("input_forget")?.unwrap_or(0) == 0
        && activations.is_none_or(|a| a == ["Sigmoid", "Tanh", "Tanh"]);
    Ok((expand(Lstm { common, plain }), vec![]))
}

/// The importer's view of one ONNX `LSTM` node.
#[derive(Debug, Clone)]
struct Lstm {
    common: CommonRec,
    /// Attributes the fused op covers: forward, default activations, no clip, no coupled gates.
    plain: bool,
}

impl Lstm {
    /// The node as one [`LstmSeq`], outputs in ONNX's layout; `None` when it is not the plain
    /// case the op covers.
    fn wire_fused(
        &self,
        prefix: &str,
        target: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<Option<TVec<OutletId>>> {
        let c = &self.common;
        if !self.plain
            || c.batch_first
            || c.optional_p_input.is_some()
            || c.optional_sequence_lens_input.is_some()
        {
            return Ok(None);
        }
        // PyTorch exports the zero initial state as zeros shaped like the batch: fine, anything
        // else is not.
        for slot in [c.optional_initial_h_input, c.optional_initial_c_input]
            .into_iter()
            .flatten()
        {
            let fact = target.outlet_fact(inputs[slot])?;
            let zero = fact
                .konst
                .as_ref()
                .or(fact.uniform.as_ref())
                .is_some_and(|v| {
                    v.to_plain_array_view::<f32>()
                        .is_ok_and(|v| v.iter().all(|x| *x == 0.0))
                });
            if !zero {
                return Ok(None);
            }
        }
        let konst = |ix: usize| -> TractResult<Option<Arc<Tensor>>> {
            Ok(target.outlet_fact(inputs[ix])?.konst.clone())
        };
        let (Some(w), Some(r)) = (konst(1)?, konst(2)?) else {
            return Ok(None);
        };
        let b = match c.optional_bias_input {
            Some(ix) => match konst(ix)? {
                Some(b) => Some(b),
                None => return Ok(None),
            },
            None => None,
        };
        if target.outlet_fact(inputs[0])?.datum_type != f32::datum_type()
            || w.datum_type() != f32::datum_type()
            || w.shape()[0] != 1
        {
            return Ok(None);
        }
        let op = LstmSeq::new(&w, &r, b.as_deref())?;
        let outs = target.wire_node(prefix, op, &[inputs[0]])?;
        // ONNX: Y [T, 1, B, H], Y_h and Y_c [1, B, H]; LstmSeq yields them without the
        // direction axis.
        let mut result = tvec!(0.into(); c.nboutputs()?);
        for (slot, out, axis, name) in [
            (c.optional_y_output, outs[0], 1, "y"),
            (c.optional_y_h_output, outs[1], 0, "y_h"),
            (c.optional_y_c_output, outs[2], 0, "y_c"),
        ] {
            if let Some(slot) = slot {
                result[slot] =
                    target.wire_node(format!("{prefix}.{name}"), AxisOp::Add(axis), &[out])?[0];
            }
        }
        Ok(Some(result))
    }
}

impl Expansion for Lstm {
    fn name(&self) -> StaticName {
        "LSTM".into()
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn nboutputs(&self) -> TractResult<usize> {
        self.common.nboutputs()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        self.common.rules(s, inputs, outputs)
    }

    fn wire(
        &self,
        prefix: &str,
        target: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        match self.wire_fused(prefix, target, inputs)? {
            Some(outputs) => Ok(outputs),
            None => self.common.wire(prefix, target, inputs),
        }
    }
}

/// A forward LSTM over a whole sequence from a zero state, ONNX gate order (i, o, f, c).
///
/// Input `X` `[T, batch, I]`; outputs `Y` `[T, batch, H]`, `Y_h` and `Y_c` `[batch, H]`.
///
/// Inside, a step works feature-major: its gates are `[4H, batch]` = `W · x_tᵀ + R · h_{t-1}ᵀ +
/// bias`, so the three sigmoid gates are one contiguous block, the tanh gate another, and the
/// cell update runs over whole `[H, batch]` slices. Per-row calls of the activations cost more
/// than the arithmetic at a hidden size of 32 (the demo-lstm at batch 256: 3.7 ms a call
/// row-major, 2.5 ms feature-major; docs/NOTES.md).
#[derive(Debug, Clone, PartialEq)]
pub struct LstmSeq {
    hidden: usize,
    input: usize,
    /// `W`, `[4H, I]` row-major, as ONNX stores it.
    w: Arc<Vec<f32>>,
    /// `R`, `[4H, H]` row-major.
    r: Arc<Vec<f32>>,
    /// `Wᵀ` `[I, 4H]` and `Rᵀ` `[H, 4H]`, for narrow batches (see [`narrow_acc`]).
    w_t: Arc<Vec<f32>>,
    r_t: Arc<Vec<f32>>,
    /// `Wb + Rb`, `[4H]`: both are added to every step's gates, so once is enough.
    bias: Arc<Vec<f32>>,
}

impl LstmSeq {
    /// From ONNX's `W` `[1, 4H, I]`, `R` `[1, 4H, H]` and optional `B` `[1, 8H]`.
    fn new(w: &Tensor, r: &Tensor, b: Option<&Tensor>) -> TractResult<LstmSeq> {
        let (g, input) = (w.shape()[1], w.shape()[2]);
        let hidden = r.shape()[2];
        ensure!(
            g == 4 * hidden && r.shape()[1] == g,
            "LSTM weights of shapes {:?} and {:?}",
            w.shape(),
            r.shape()
        );
        let flat = |t: &Tensor, cols: usize, transpose: bool| -> TractResult<Arc<Vec<f32>>> {
            let v = t.to_plain_array_view::<f32>()?;
            let m = v.to_shape((g, cols))?;
            let m = if transpose { m.reversed_axes() } else { m };
            Ok(Arc::new(m.iter().copied().collect()))
        };
        let mut bias = vec![0f32; g];
        if let Some(b) = b {
            let b: Vec<f32> = b.to_plain_array_view::<f32>()?.iter().copied().collect();
            ensure!(
                b.len() == 2 * g,
                "LSTM bias of {} values for {g} gates",
                b.len()
            );
            for (j, v) in bias.iter_mut().enumerate() {
                *v = b[j] + b[g + j];
            }
        }
        Ok(LstmSeq {
            hidden,
            input,
            w: flat(w, input, false)?,
            r: flat(r, hidden, false)?,
            w_t: flat(w, input, true)?,
            r_t: flat(r, hidden, true)?,
            bias: Arc::new(bias),
        })
    }

    /// `Y` `[T, batch, H]` and the last cell state `[batch, H]`.
    fn run(&self, x: &[f32], t_len: usize, batch: usize) -> TractResult<(Vec<f32>, Vec<f32>)> {
        let (h, i) = (self.hidden, self.input);
        let hb = h * batch;
        let sigmoid = Func::Sigmoid.ew_f32()?;
        let tanh = Func::Tanh.ew_f32()?;
        let mut y = vec![0f32; t_len * hb];
        let mut gates = vec![0f32; 4 * hb];
        let mut c = vec![0f32; hb]; // [H, batch]
        let mut h_t = vec![0f32; hb]; // [H, batch]
        let mut b_col = vec![0f32; h.max(i)];
        for t in 0..t_len {
            for (row, b) in gates.chunks_exact_mut(batch).zip(self.bias.iter()) {
                row.fill(*b);
            }
            // x_t is [batch, I] row-major: as the [I, batch] operand, strides (1, I).
            let x_t = &x[t * batch * i..(t + 1) * batch * i];
            if batch < NARROW {
                narrow_acc(&self.w_t, x_t, (1, i), batch, &mut gates, &mut b_col[..i]);
                if t > 0 {
                    narrow_acc(
                        &self.r_t,
                        &h_t,
                        (batch, 1),
                        batch,
                        &mut gates,
                        &mut b_col[..h],
                    );
                }
            } else {
                gemm_acc((4 * h, i, batch), &self.w, (i, 1), x_t, (1, i), &mut gates)?;
                if t > 0 {
                    gemm_acc(
                        (4 * h, h, batch),
                        &self.r,
                        (h, 1),
                        &h_t,
                        (batch, 1),
                        &mut gates,
                    )?;
                }
            }
            let (sig, cand) = gates.split_at_mut(3 * hb);
            sigmoid.run(sig)?;
            tanh.run(cand)?;
            let (gi, rest) = sig.split_at(hb);
            let (go, gf) = rest.split_at(hb);
            for j in 0..hb {
                c[j] = gf[j] * c[j] + gi[j] * cand[j];
            }
            h_t.copy_from_slice(&c);
            tanh.run(&mut h_t)?;
            for (v, o) in h_t.iter_mut().zip(go) {
                *v *= o;
            }
            // Y's step is [batch, H]: the transpose of h_t.
            let y_t = &mut y[t * hb..(t + 1) * hb];
            for (j, row) in h_t.chunks_exact(batch).enumerate() {
                for (b, v) in row.iter().enumerate() {
                    y_t[b * h + j] = *v;
                }
            }
        }
        let mut c_out = vec![0f32; hb];
        for (j, row) in c.chunks_exact(batch).enumerate() {
            for (b, v) in row.iter().enumerate() {
                c_out[b * h + j] = *v;
            }
        }
        Ok((y, c_out))
    }
}

/// Below this batch size a step's products skip `matrixmultiply`, whose packing of the weights
/// on every call costs more than the arithmetic of one column: the demo-lstm at batch 1 took
/// 103 µs a call through it and 64 µs with [`narrow_acc`]; at batch 2 the packing already pays
/// (116 µs against 160 µs or more).
const NARROW: usize = 2;

/// `c += a · b` like [`gemm_acc`] for a narrow `b` `[k, n]`, from `a_t` = `aᵀ` `[k, m]`
/// row-major. Per column of `b` and per block of 16 rows of `c`, the 16 sums stay in registers
/// over the whole of `k` (multiply-adds over contiguous rows of `a_t`, which vectorise).
/// `b_col` is scratch of `k` values.
fn narrow_acc(
    a_t: &[f32],
    b: &[f32],
    (b_row, b_col_stride): (usize, usize),
    n: usize,
    c: &mut [f32],
    b_col: &mut [f32],
) {
    const BLOCK: usize = 32;
    let k = b_col.len();
    let m = a_t.len() / k;
    for col in 0..n {
        for (kk, v) in b_col.iter_mut().enumerate() {
            *v = b[kk * b_row + col * b_col_stride];
        }
        let mut j0 = 0;
        while j0 < m {
            let width = BLOCK.min(m - j0);
            let mut acc = [0f32; BLOCK];
            if width == BLOCK {
                for (kk, v) in b_col.iter().enumerate() {
                    let row: &[f32; BLOCK] =
                        a_t[kk * m + j0..kk * m + j0 + BLOCK].try_into().unwrap();
                    for (s, a) in acc.iter_mut().zip(row) {
                        *s += v * a;
                    }
                }
            } else {
                for (kk, v) in b_col.iter().enumerate() {
                    for (s, a) in acc.iter_mut().zip(&a_t[kk * m + j0..kk * m + j0 + width]) {
                        *s += v * a;
                    }
                }
            }
            for (l, s) in acc[..width].iter().enumerate() {
                c[(j0 + l) * n + col] += s;
            }
            j0 += width;
        }
    }
}

/// `c += a · b`, `c` `[m, n]` row-major, `a` `[m, k]` and `b` `[k, n]` given by their strides
/// (row, column): ndarray hands f32 matrices to `matrixmultiply`'s sgemm, which packs any
/// strides and picks its AVX2/FMA/AVX-512 kernel at run time.
fn gemm_acc(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    c: &mut [f32],
) -> TractResult<()> {
    let a = ArrayView2::from_shape((m, k).strides(a_strides), a)?;
    let b = ArrayView2::from_shape((k, n).strides(b_strides), b)?;
    let mut c = ArrayViewMut2::from_shape((m, n), &mut c[..m * n])?;
    general_mat_mul(1.0, &a, &b, 1.0, &mut c);
    Ok(())
}

// The weights are finite constants of one model, so equality is an equivalence here.
impl Eq for LstmSeq {}

impl Op for LstmSeq {
    fn name(&self) -> StaticName {
        "LstmSeq".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("hidden={} input={}", self.hidden, self.input)])
    }

    op_as_typed_op!();
}

impl EvalOp for LstmSeq {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let &[t_len, batch, i] = x.shape() else {
            bail!("LstmSeq expects X of rank 3, got {:?}", x.shape());
        };
        ensure!(
            i == self.input,
            "LstmSeq expects {} input features, got {i}",
            self.input
        );
        ensure!(t_len > 0, "LstmSeq needs at least one timestep");
        let x = x.as_standard_layout();
        let x = x.as_slice().context("X not contiguous")?;
        let (y, c) = self.run(x, t_len, batch)?;
        let h = self.hidden;
        let y_h = y[(t_len - 1) * batch * h..].to_vec();
        Ok(tvec!(
            Array3::from_shape_vec((t_len, batch, h), y)?.into_tvalue(),
            Array2::from_shape_vec((batch, h), y_h)?.into_tvalue(),
            Array2::from_shape_vec((batch, h), c)?.into_tvalue(),
        ))
    }
}

impl TypedOp for LstmSeq {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(x.rank() == 3, "LstmSeq expects X of rank 3, got {x:?}");
        let (t, b, h) = (x.shape[0].clone(), x.shape[1].clone(), self.hidden.to_dim());
        Ok(tvec!(
            f32::fact([t, b.clone(), h.clone()]),
            f32::fact([b.clone(), h.clone()]),
            f32::fact([b, h]),
        ))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// The LSTM as ONNX defines it, one scalar at a time.
    fn reference(op_in: &Inputs, t_len: usize, batch: usize) -> (Vec<f32>, Vec<f32>) {
        let (h, i) = (op_in.hidden, op_in.input);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (mut hs, mut cs) = (vec![0f32; batch * h], vec![0f32; batch * h]);
        let mut y = vec![];
        for t in 0..t_len {
            let mut next = vec![0f32; batch * h];
            for b in 0..batch {
                let gate = |g: usize, j: usize| {
                    let row = g * h + j;
                    let mut v = op_in.b[row] + op_in.b[4 * h + row];
                    for k in 0..i {
                        v += op_in.w[row * i + k] * op_in.x[(t * batch + b) * i + k];
                    }
                    for k in 0..h {
                        v += op_in.r[row * h + k] * hs[b * h + k];
                    }
                    v
                };
                for j in 0..h {
                    let (gi, go, gf, gc) = (
                        sig(gate(0, j)),
                        sig(gate(1, j)),
                        sig(gate(2, j)),
                        gate(3, j).tanh(),
                    );
                    let c = gf * cs[b * h + j] + gi * gc;
                    cs[b * h + j] = c;
                    next[b * h + j] = go * c.tanh();
                }
            }
            hs = next;
            y.extend_from_slice(&hs);
        }
        (y, cs)
    }

    struct Inputs {
        hidden: usize,
        input: usize,
        x: Vec<f32>,
        w: Vec<f32>,
        r: Vec<f32>,
        b: Vec<f32>,
    }

    #[test]
    fn the_whole_sequence_op_is_the_onnx_lstm_on_both_paths() {
        let mut rng = SmallRng::seed_from_u64(7);
        // Batch 1 takes the narrow loops, the others matrixmultiply; hidden sizes that are and
        // are not multiples of the 32-row block.
        for (hidden, input, t_len, batch) in [
            (32, 5, 16, 1),
            (32, 5, 16, 9),
            (7, 3, 5, 1),
            (7, 3, 5, 4),
            (20, 1, 3, 300),
        ] {
            let mut draw =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let g = 4 * hidden;
            let inp = Inputs {
                hidden,
                input,
                x: draw(t_len * batch * input),
                w: draw(g * input),
                r: draw(g * hidden),
                b: draw(2 * g),
            };
            let tensor = |v: &[f32], shape: &[usize]| Tensor::from_shape(shape, v).unwrap();
            let op = LstmSeq::new(
                &tensor(&inp.w, &[1, g, input]),
                &tensor(&inp.r, &[1, g, hidden]),
                Some(&tensor(&inp.b, &[1, 2 * g])),
            )
            .unwrap();
            let out = op
                .eval(
                    &EvalContext::out_of_plan(),
                    tvec!(tensor(&inp.x, &[t_len, batch, input]).into_tvalue()),
                )
                .unwrap();
            let (want_y, want_c) = reference(&inp, t_len, batch);
            let got = |ix: usize| {
                out[ix]
                    .to_plain_array_view::<f32>()
                    .unwrap()
                    .iter()
                    .copied()
                    .collect::<Vec<_>>()
            };
            let worst = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max)
            };
            let case = format!("hidden {hidden}, input {input}, {t_len} steps, batch {batch}");
            assert_eq!(out[0].shape(), [t_len, batch, hidden], "{case}");
            assert!(
                worst(&got(0), &want_y) < 1e-5,
                "Y off by {} ({case})",
                worst(&got(0), &want_y)
            );
            assert_eq!(
                got(1),
                got(0)[(t_len - 1) * batch * hidden..],
                "Y_h is Y's last step ({case})"
            );
            assert!(
                worst(&got(2), &want_c) < 1e-5,
                "Y_c off by {} ({case})",
                worst(&got(2), &want_c)
            );
        }
    }
}
