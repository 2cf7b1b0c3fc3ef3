// Package suggest finds the known word a mistyped one was probably meant to
// be, for "did you mean …?" hints in configuration errors.
package suggest

// Closest returns the word of known nearest to word by edit distance, if it
// is within maxDistance edits.
func Closest(word string, known []string, maxDistance int) (string, bool) {
	best, bestDist := "", -1
	for _, k := range known {
		if d := Distance(word, k); bestDist < 0 || d < bestDist {
			best, bestDist = k, d
		}
	}
	return best, bestDist >= 0 && bestDist <= maxDistance
}

// Distance is the Levenshtein distance between a and b (in bytes).
func Distance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
