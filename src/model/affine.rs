//! Products with a constant weight matrix, bias included, as one op each.
//!
//! The toolkit's models are chains of small linear layers (`Gemm` of 8 → 32 → 4 → 32 → 8 for the
//! dense demo, and the per-feature `MatMul` maps of the normalisation around them). tract 0.23.9
//! runs each through its matrix kernels with the layer's outputs on the kernel's 64-row axis:
//! a layer of 4 or 8 outputs fills 1/16 or 1/8 of every tile, and the batch is packed again before
//! each product. On the 8-feature dense model of `scripts/bench.sh` the six products took 64 % of
//! a batch of 256 (110 µs of 171, `tract_vs_ort --profile`), more than onnxruntime's whole call.
//! [`fuse`] replaces every product of an activation's last axis by a constant matrix, and the
//! constant bias added to it, by an [`Affine`] op that runs it as one `[rows, K] · [K, N]` product
//! (`matrixmultiply`, which picks its AVX2/FMA or AVX-512 kernel at run time) onto the bias:
//! the rows of the batch fill the kernel. The bias is added after the product, as tract does;
//! the kernels may sum in another order, so the op declares `Validation::Rounding` (the bench's
//! replay stayed byte-identical, and `test_parity.py` holds every kind to 1e-4).

use std::sync::Arc;

use tract_onnx::tract_core::ndarray::{ArrayD, Ix2};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};
use tract_onnx::tract_hir::internal::*;

use super::recurrent::{gemm_acc, matvec_acc};

/// Replaces each product with a constant `[K, N]` matrix over an f32 activation's last axis
/// (and the constant bias added right after it, if any) by an [`Affine`]; returns how many.
pub fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        if let Some(patch) = patch(model, id)? {
            patch.apply(model)?;
            fused += 1;
        }
    }
    Ok(fused)
}

/// The patch that fuses node `id`, when it is such a product.
fn patch(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(einsum) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    if einsum.q_params.is_some()
        || einsum.operating_dt != f32::datum_type()
        || node.inputs.len() != 2
    {
        return Ok(None);
    }
    let x = model.outlet_fact(node.inputs[0])?;
    let Some(w) = model.outlet_fact(node.inputs[1])?.konst.clone() else {
        return Ok(None);
    };
    if x.datum_type != f32::datum_type() || w.datum_type() != f32::datum_type() || w.rank() != 2 {
        return Ok(None);
    }
    let out_fact = model.outlet_fact(OutletId::new(id, 0))?;
    let Some(layout) = Layout::of(&einsum.axes, x, out_fact.rank()) else {
        return Ok(None);
    };
    let w = w
        .to_plain_array_view::<f32>()?
        .into_dimensionality::<Ix2>()?;
    // `[K, N]` row-major, whichever way the file stores it.
    let w = if layout.k_row { w } else { w.reversed_axes() };
    let (k, n) = w.dim();
    if k == 0 || n == 0 {
        // Nothing to gain, and `Affine` counts rows by `K`.
        return Ok(None);
    }
    let mut op = Affine {
        k,
        n,
        w: Arc::new(w.iter().copied().collect()),
        bias: None,
    };
    // The bias: the only consumer adds a constant of N values along the last axis.
    let mut replaced = OutletId::new(id, 0);
    let succs = &node.outputs[0].successors;
    if let [succ] = succs.as_slice() {
        let add = model.node(succ.node);
        let other = add.inputs[1 - succ.slot];
        if add.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>())
            && model.outlet_fact(OutletId::new(add.id, 0))?.shape == out_fact.shape
            && !model.output_outlets()?.contains(&OutletId::new(id, 0))
        {
            if let Some(b) = &model.outlet_fact(other)?.konst {
                let along_last = b.rank() <= out_fact.rank()
                    && b.shape().iter().rev().skip(1).all(|&d| d == 1)
                    && b.shape().last().is_some_and(|&d| d == n);
                if b.datum_type() == f32::datum_type() && along_last {
                    op.bias = Some(Arc::new(
                        b.to_plain_array_view::<f32>()?.iter().copied().collect(),
                    ));
                    replaced = OutletId::new(add.id, 0);
                }
            }
        }
    }
    let mut patch = TypedModelPatch::new(format!("affine {}", node.name));
    let mut wire = patch.tap_model(model, node.inputs[0])?;
    for (i, &axis) in layout.removed.iter().rev().enumerate() {
        wire = patch.wire_node(format!("{}.rm{i}", node.name), AxisOp::Rm(axis), &[wire])?[0];
    }
    wire = patch.wire_node(&node.name, op, &[wire])?[0];
    for (i, &(from, to)) in layout.moves.iter().enumerate() {
        let mv = AxisOp::Move(from, to);
        wire = patch.wire_node(format!("{}.move{i}", node.name), mv, &[wire])?[0];
    }
    for (i, &axis) in layout.added.iter().enumerate() {
        wire = patch.wire_node(format!("{}.add{i}", node.name), AxisOp::Add(axis), &[wire])?[0];
    }
    patch.shunt_outside(model, replaced, wire)?;
    Ok(Some(patch))
}

/// How an einsum of an activation `x` (input 0) and a matrix (input 1) maps onto an [`Affine`]:
/// it contracts `x`'s last axis with one of the matrix's, puts the matrix's other axis last in
/// its output, and keeps `x`'s other axes, except axes of one element it drops or adds (an ONNX
/// `Flatten` or `Reshape` around a `Gemm` folds into the einsum that way). It may reorder the
/// axes it keeps: tract folds the `Transpose` of a recurrent layer's `[T, batch, H]` output into
/// the next product (the demo-lstm's output layer), which then runs as the product and a move of
/// the axes, since the bias along the last axis commutes with it.
struct Layout {
    /// Whether the matrix is `[K, N]` (true) or `[N, K]`.
    k_row: bool,
    /// `x`'s axes of one element the output does not have, ascending.
    removed: Vec<usize>,
    /// `AxisOp::Move`s that put the product's kept axes (in `x`'s order) in the output's order.
    moves: Vec<(usize, usize)>,
    /// The output's axes of one element `x` does not have, ascending.
    added: Vec<usize>,
}

impl Layout {
    fn of(axes: &AxesMapping, x: &TypedFact, out_rank: usize) -> Option<Layout> {
        let rank = x.rank();
        if rank == 0 || axes.input_count() != 2 || axes.output_count() != 1 {
            return None;
        }
        let (mut k_row, mut n_found) = (None, false);
        let (mut kept, mut removed, mut added) = (vec![], vec![], vec![]);
        for axis in axes.iter_all_axes() {
            let (xs, w, out) = (&*axis.inputs[0], &*axis.inputs[1], &*axis.outputs[0]);
            match (xs, w, out) {
                (&[i], [], &[o]) if i + 1 < rank => kept.push((i, o)),
                (&[i], [], []) if x.shape[i].is_one() => removed.push(i),
                ([], [], &[o]) if o + 1 < out_rank => added.push(o),
                (&[i], &[p], []) if i + 1 == rank => k_row = Some(p == 0),
                ([], &[_], &[o]) if o + 1 == out_rank => n_found = true,
                _ => return None,
            }
        }
        kept.sort_unstable();
        removed.sort_unstable();
        added.sort_unstable();
        // Where each kept axis goes among the kept ones, in `x`'s order; then the moves that sort
        // them, one axis at a time.
        let mut order: Vec<usize> = kept
            .iter()
            .map(|&(_, o)| kept.iter().filter(|k| k.1 < o).count())
            .collect();
        let mut moves = vec![];
        for to in 0..order.len() {
            let from = order.iter().position(|&p| p == to)?;
            if from != to {
                moves.push((from, to));
                let axis = order.remove(from);
                order.insert(to, axis);
            }
        }
        Some(Layout {
            k_row: k_row.filter(|_| n_found)?,
            removed,
            moves,
            added,
        })
    }
}

/// `y = x · W + b` over the last axis of `x`, for a constant `W` `[K, N]` and bias `b` `[N]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    k: usize,
    n: usize,
    /// `W`, `[K, N]` row-major.
    w: Arc<Vec<f32>>,
    bias: Option<Arc<Vec<f32>>>,
}

// The weights are finite constants of one model, so equality is an equivalence here.
impl Eq for Affine {}

impl Affine {
    /// `x` holds `rows` rows of `K` values; the result `rows` rows of `N`.
    fn run(&self, x: &[f32], rows: usize) -> TractResult<Vec<f32>> {
        let (k, n) = (self.k, self.n);
        let mut y = match &self.bias {
            Some(b) => {
                let mut y = Vec::with_capacity(rows * n);
                for _ in 0..rows {
                    y.extend_from_slice(b);
                }
                y
            }
            None => vec![0f32; rows * n],
        };
        match rows {
            0 => {}
            // One row skips matrixmultiply's packing, which costs more than the arithmetic.
            1 => matvec_acc(&self.w, x, 1, &mut y),
            _ => gemm_acc((rows, k, n), x, (k, 1), &self.w, (n, 1), &mut y)?,
        }
        Ok(y)
    }
}

impl Op for Affine {
    fn name(&self) -> StaticName {
        "Affine".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "k={} n={}{}",
            self.k,
            self.n,
            if self.bias.is_some() { " +bias" } else { "" }
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for Affine {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].to_plain_array_view::<f32>()?;
        ensure!(
            x.shape().last() == Some(&self.k),
            "Affine expects {} values on the last axis, got {:?}",
            self.k,
            x.shape()
        );
        let mut shape: TVec<usize> = x.shape().into();
        let rows = x.len() / self.k;
        let x = x.as_standard_layout();
        let y = self.run(x.as_slice().context("x not contiguous")?, rows)?;
        *shape.last_mut().expect("rank checked") = self.n;
        Ok(tvec!(ArrayD::from_shape_vec(&*shape, y)?.into_tvalue()))
    }
}

impl TypedOp for Affine {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.to_tvec();
        ensure!(
            shape.last() == Some(&self.k.to_dim()),
            "Affine expects {} values on the last axis, got {:?}",
            self.k,
            inputs[0]
        );
        *shape.last_mut().expect("rank checked") = self.n.to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use tract_onnx::tract_core::ops::math::add;

    /// A model of one einsum of a source and a constant, plus a constant bias along the output's
    /// last axis when `bias`; axis letters are sized by `sizes`.
    fn model(expr: &str, sizes: &[(char, usize)], bias: bool) -> TractResult<TypedModel> {
        let size = |c: char| sizes.iter().find(|s| s.0 == c).map(|s| s.1).unwrap();
        let (inputs, out) = expr.split_once("->").unwrap();
        let (xs, ws) = inputs.split_once(',').unwrap();
        let mut rng = SmallRng::seed_from_u64(expr.len() as u64);
        let mut random = |shape: Vec<usize>| {
            let len = shape.iter().product();
            let data: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
            Tensor::from_shape(&shape, &data)
        };
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact(xs.chars().map(size).collect::<Vec<_>>()))?;
        let w = m.add_const("w", random(ws.chars().map(size).collect())?)?;
        let axes = expr.parse::<AxesMapping>()?;
        let mut y = m.wire_node("mm", EinSum::new(axes, f32::datum_type()), &[x, w])?[0];
        if bias {
            let out_rank = m.outlet_fact(y)?.rank();
            let mut shape = vec![1; out_rank];
            shape[out_rank - 1] = size(out.chars().last().unwrap());
            let b = m.add_const("b", random(shape)?)?;
            y = m.wire_node("add", add(), &[y, b])?[0];
        }
        m.select_output_outlets(&[y])?;
        Ok(m)
    }

    fn run(m: TypedModel, x: &Tensor) -> TractResult<Tensor> {
        let out = m.into_runnable()?.run(tvec!(x.clone().into()))?;
        Ok(out[0].clone().into_tensor())
    }

    /// Fuses the model of `expr` and checks the fused model's output against the einsum's own,
    /// returning how many products were fused.
    fn fused_matches(expr: &str, sizes: &[(char, usize)], bias: bool) -> TractResult<usize> {
        let plain = model(expr, sizes, bias)?;
        let mut fused = plain.clone();
        let count = fuse(&mut fused)?;
        let shape: Vec<usize> = plain.input_fact(0)?.shape.as_concrete().unwrap().to_vec();
        let len = shape.iter().product();
        let mut rng = SmallRng::seed_from_u64(7);
        let data: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0..3.0)).collect();
        let x = Tensor::from_shape(&shape, &data)?;
        let (want, got) = (run(plain, &x)?, run(fused.clone(), &x)?);
        assert_eq!(want.shape(), got.shape(), "{expr}");
        let (want, got) = (
            want.to_plain_array_view::<f32>()?,
            got.to_plain_array_view::<f32>()?,
        );
        for (a, b) in want.iter().zip(&got) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                "{expr}: {a} vs {b}"
            );
        }
        let affines = fused.nodes().iter().filter(|n| n.op_is::<Affine>()).count();
        assert_eq!(affines, count, "{expr}: one Affine per fused product");
        let adds = fused
            .nodes()
            .iter()
            .filter(|n| n.op_is::<TypedBinOp>())
            .count();
        assert_eq!(
            adds,
            usize::from(bias && count == 0),
            "{expr}: the bias joins the Affine"
        );
        Ok(count)
    }

    #[test]
    fn products_over_the_last_axis_fuse_with_their_bias_and_keep_their_values() -> TractResult<()> {
        let sizes = [('a', 2), ('b', 5), ('t', 3), ('k', 4), ('n', 6), ('o', 1)];
        for bias in [false, true] {
            for expr in [
                "bk,kn->bn",     // Gemm
                "bk,nk->bn",     // Gemm with transB
                "btk,kn->btn",   // MatMul over a window
                "bok,kn->bn",    // Flatten of a [batch, 1, K] before the Gemm
                "bk,kn->bon",    // Unsqueeze after it
                "tbk,kn->btn",   // the transpose after a recurrent layer
                "btok,kn->tbn",  // the same after a Flatten
                "tbk,nk->obtn",  // ...before an Unsqueeze
                "abtk,kn->tban", // three axes reordered
            ] {
                assert_eq!(fused_matches(expr, &sizes, bias)?, 1, "{expr} bias={bias}");
            }
            // One row takes the matrix-vector path.
            assert_eq!(
                fused_matches("bk,kn->bn", &[('b', 1), ('k', 4), ('n', 6)], bias)?,
                1
            );
        }
        Ok(())
    }

    #[test]
    fn other_products_are_left_alone() -> TractResult<()> {
        let sizes = [('b', 5), ('t', 3), ('k', 4), ('n', 6)];
        for expr in [
            "kb,kn->bn",  // contracts x's first axis
            "bk,kn->nb",  // the matrix's axis is not last
            "btk,kn->bn", // sums over an axis of x that is not of one element
        ] {
            assert_eq!(fused_matches(expr, &sizes, true)?, 0, "{expr}");
        }
        // An empty matrix (a hostile or degenerate file) stays tract's.
        let empty = [('b', 5), ('k', 0), ('n', 6)];
        assert_eq!(fused_matches("bk,kn->bn", &empty, true)?, 0);
        Ok(())
    }
}
