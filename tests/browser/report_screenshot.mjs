// Open a conceptctl report.html in headless Chromium, report page errors and broken images,
// and save a full-page screenshot. A manual check (CI has no browser), run once per report
// layout change:
//   (cd tests/browser && npm install @sparticuz/chromium puppeteer-core)  # carries Chromium
//   node tests/browser/report_screenshot.mjs file:///abs/path/report.html shot.png
import chromium from '@sparticuz/chromium';
import puppeteer from 'puppeteer-core';
const [,, url, out] = process.argv;
const browser = await puppeteer.launch({args: chromium.args, executablePath: await chromium.executablePath(), headless: true});
const page = await browser.newPage();
const errors = [];
page.on('pageerror', e => errors.push(String(e)));
page.on('console', m => { if (m.type() === 'error') errors.push(m.text()); });
page.on('requestfailed', r => errors.push('request failed: ' + r.url()));
await page.setViewport({width: 1200, height: 900});
await page.goto(url, {waitUntil: 'load'});
const info = await page.evaluate(() => ({images: document.images.length,
  loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,
  verdict: document.getElementById('verdict')?.textContent}));
await page.screenshot({path: out, fullPage: true});
console.log(JSON.stringify({errors, ...info}));
await browser.close();
